"""The GPU tier: real training runs on one and two GPUs, and the results file they leave.

Every test here carries the ``gpu`` marker and is skipped, with the reason, where no
CUDA device is present (CPU CI shows them as skipped). Rows that need two GPUs skip
on a machine with one. ``bash benchmarks/gpu_suite.sh tier`` installs what is missing, runs
this folder and writes ``MMTRAIN_GPU_RESULTS`` (one record per row: config, features,
GPUs, passed, seconds, the error if any; with the device, library versions and the
code commit).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NO_GPU = "no CUDA device: the GPU tier runs on a machine with one (bash benchmarks/gpu_suite.sh tier)"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    count = gpu_count()
    mine = []
    for index, item in enumerate(items):
        if here not in Path(str(item.fspath)).parents:
            continue
        mine.append(index)
        item.add_marker(pytest.mark.gpu)
        needed = item.get_closest_marker("gpus")
        needed = needed.args[0] if needed else 1
        if count == 0:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))
        elif count < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} GPUs, this machine has {count}"))
    if count:
        # Rows run several at a time (pytest-xdist hands them out in this order): the slowest
        # first, so that none starts last and holds the whole run up.
        ordered = slowest_first([items[i] for i in mine], row_seconds())
        for index, item in zip(mine, ordered):
            items[index] = item


RESULTS = REPO / "benchmarks" / "results"


def row_seconds(*folders: Path) -> dict[str, float]:
    """Each row's longest time in the tier results kept in ``folders`` (``gpu_tier_*.json``).

    By default the current results and the archived ones: an old run's time is still a
    fair guess of how long a row takes, and ordering is all it is used for.
    """
    seconds: dict[str, float] = {}
    paths = [path for folder in (folders or (RESULTS, RESULTS / "archive")) for path in sorted(folder.glob("gpu_tier_*.json"))]
    for path in paths:
        try:
            rows = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError, AttributeError):
            continue
        for r in rows:
            if isinstance(r, dict) and isinstance(r.get("seconds"), (int, float)) and "row" in r:
                seconds[r["row"]] = max(seconds.get(r["row"], 0.0), float(r["seconds"]))
    return seconds


def slowest_first(items: list, seconds: dict[str, float]) -> list:
    """``items`` by their rows' recorded time, longest first; rows never timed (new ones) before all."""
    return sorted(items, key=lambda item: -seconds.get(item.name, float("inf")))


# -- the results file -------------------------------------------------------------
_ROWS: list[dict] = []


def pytest_runtest_logreport(report):
    if "tests/gpu/" not in report.nodeid.replace(os.sep, "/"):
        return
    props = dict(report.user_properties)
    if report.when == "call" or (report.when == "setup" and not report.passed):
        error = None
        if report.failed:
            error = _short_error(report)
        _ROWS.append(
            {
                "row": report.nodeid.split("::", 1)[-1],
                **props.get("row", {}),
                "outcome": report.outcome,
                "passed": report.passed,
                "seconds": round(report.duration, 1),
                "error": error,
                "skip_reason": report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else None,
            }
        )


def _short_error(report) -> str:
    text = str(report.longrepr)
    lines = [line for line in text.splitlines() if line.strip()]
    # the assertion line, then the end of the run's output, where its exception is
    key = [line for line in lines if line.startswith("E ")]
    if len(key) > 14:
        key = key[:2] + ["E           ..."] + key[-12:]
    return "\n".join(key or lines[-20:])[-3000:]


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("MMTRAIN_GPU_RESULTS")
    if not target or hasattr(session.config, "workerinput") or not _ROWS:
        return
    result = {
        "what": "GPU tier: tests/gpu rows (real mmtrain/train.py runs on tiny presets)",
        "command": os.environ.get("MMTRAIN_GPU_COMMAND", " ".join(sys.argv)),
        "code_commit": os.environ.get("MMTRAIN_CODE_COMMIT", "unknown"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "summary": {
            "rows": len(_ROWS),
            "passed": sum(r["passed"] for r in _ROWS),
            "failed": sum(r["outcome"] == "failed" for r in _ROWS),
            "skipped": sum(r["outcome"] == "skipped" for r in _ROWS),
        },
        "rows": sorted(_ROWS, key=lambda r: r["row"]),
    }
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(result, indent=2) + "\n")


def environment() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "accelerate", "peft", "deepspeed", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as err:  # a missing package is itself a finding
            versions[name] = f"missing ({type(err).__name__})"
    gpus = [torch.cuda.get_device_name(i) for i in range(gpu_count())]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    return {"gpus": gpus, "nvidia_smi": smi, "cpu_count": os.cpu_count(), "versions": versions}


@pytest.fixture(scope="session")
def data_path(tmp_path_factory):
    """Where each pytest process writes the generated dataset (once per process)."""
    return tmp_path_factory.mktemp("data")
