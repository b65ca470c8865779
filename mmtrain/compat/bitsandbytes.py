"""bitsandbytes: its CPU backend's import-time notice.

bitsandbytes' CPU backend, on CPUs with AVX512-BF16, tries to load a faster 4-bit kernel
from the optional ``kernels`` package when it is imported, and logs a warning on the
logger of its module ``bitsandbytes.backends.cpu.ops`` when that package is absent; it
then uses its own kernel, with the same numbers. peft imports bitsandbytes whenever it is
installed, so that line would open the output of every mmtrain command (whose contract
is one error line on bad input), NF4 or not. The logger's name is the module's path, not
an API: if it moved, the line would come back (tests/test_compat.py checks it does not).
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_bitsandbytes_cpu_notice() -> None:
    """Keep bitsandbytes' CPU backend to errors on its logger (works before or after its import)."""
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).setLevel(logging.ERROR)
