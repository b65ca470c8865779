"""The model package's error: bad input found before (or while) weights load."""


class ConfigError(ValueError):
    """A model setting, folder or file that cannot work; the message names it and what would.

    The command line raises the same class for its own flags (``mmtrain.args``), so one
    ``except`` catches every configuration error.
    """
