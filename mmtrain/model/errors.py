"""The model package's error: bad input found before (or while) weights load."""


class ConfigError(ValueError):
    """A model setting, folder or file that cannot work; the message names it and what would.

    The command line raises the same class for its own flags (``mmtrain.args``), so one
    ``except`` catches every configuration error. Raised below the command line, the
    message speaks of config fields (of ``VLMConfig`` or ``SpeedOptions``), listed in
    ``fields``; each command line writes them as its flags at its entry point
    (:func:`mmtrain.args.naming_flags`).
    """

    def __init__(self, message: str, *, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = tuple(fields)
