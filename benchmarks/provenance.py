"""Which code a benchmark result came from, recorded in every result file."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> dict:
    """``{"commit", "dirty"[, "code_commit"]}`` of this checkout.

    ``dirty`` lists the tracked files changed since the commit. ``MMTRAIN_CODE_COMMIT``, when
    set, is recorded as ``code_commit``: a working tree copied to another machine can carry
    older repository metadata than its files, and whoever copied it names the files' commit.
    """
    info = {"commit": os.environ.get("MMTRAIN_GIT_COMMIT", "unknown"), "dirty": os.environ.get("MMTRAIN_GIT_DIRTY")}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        info["dirty"] = ",".join(line[3:] for line in status.splitlines()) or None
    except (OSError, subprocess.CalledProcessError):
        pass
    if os.environ.get("MMTRAIN_CODE_COMMIT"):
        info["code_commit"] = os.environ["MMTRAIN_CODE_COMMIT"]
    return info
