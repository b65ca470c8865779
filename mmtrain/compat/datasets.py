"""datasets internals: its offline switch, read on each load."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def datasets_offline():
    """``datasets`` with the network off for a while: a Hub name resolves from the local cache or fails at once.

    ``--dataset_names`` takes a Hub name only as ``datasets`` cached it. ``load_dataset``
    asks the Hub first and falls back to the cache only when that fails; offline mode
    (``HF_HUB_OFFLINE``) is read into ``datasets.config.HF_HUB_OFFLINE`` when ``datasets``
    is imported, and the loader checks that attribute on each call. Setting it for the
    call keeps the run off the network without asking the user for the variable.
    """
    import datasets.config

    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was
