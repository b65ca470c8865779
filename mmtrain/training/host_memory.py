"""Host memory a piece of work takes in this process: its resident set size, sampled while it runs.

A checkpoint records what writing it cost each process (``manifest.json``,
``host_memory``), so the cost of a save at a recipe's size is read from the run itself.
"""

from __future__ import annotations

import os
import resource
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssWatch:
    """``with RssWatch() as w: ...``: ``w.growth`` is the most the resident set grew above its start meanwhile.

    A thread samples it every ``interval`` seconds (the work under watch releases the
    interpreter in its copies, writes and collectives), and once more at the end.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssWatch:
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="rss-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)
