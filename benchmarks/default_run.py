"""Time the embedded default run and record what it learned.

    python benchmarks/default_run.py [--entry python|accelerate] [--out FILE] [-- TRAINING FLAGS]

Runs ``python -m mmtrain.train`` (or ``accelerate launch mmtrain/train.py``) with no
flags in a fresh folder (as a new user would; training flags after ``--`` are added, e.g.
``-- --fp8_base`` on a GPU to compare with the float8 base), then writes its wall time, peak memory,
the start-up line that says how the process computes (device, precision, threads),
the load average around the run (a busy machine slows it), every eval record of
``metrics.jsonl`` and the final printed report, with the machine and versions, to a
JSON file. The two entry points train identically; timing both back to back shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The trainer with its float8 device check answered "runs here": torch's CPU _scaled_mm
# (torch >= 2.13) computes float8 products with the same quantisation as the GPU, slowly,
# so --fp8_base's effect on what the default run learns can be measured without a GPU.
CPU_FLOAT8 = "from mmtrain.model import fp8; fp8.float8_matmul_problem = lambda device: None; from mmtrain.train import cli; cli()"
ENTRY_POINTS = {
    "python": [sys.executable, "-m", "mmtrain.train"],
    "python-cpu-float8": [sys.executable, "-c", CPU_FLOAT8],
    # accelerate's own command line, without a config: what a cluster user types
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", str(REPO / "mmtrain" / "train.py")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", choices=sorted(ENTRY_POINTS), default="python", help="how the run is started")
    parser.add_argument("--out", help="default: benchmarks/results/default_run_cpu.json (_accelerate.json for --entry accelerate)")
    parser.add_argument("flags", nargs="*", help="training flags after --, added to the default run's none")
    args = parser.parse_args()
    suffix = "" if args.entry == "python" else f"_{args.entry.replace('-', '_')}"
    args.out = args.out or str(REPO / "benchmarks" / "results" / f"default_run_cpu{suffix}.json")
    with tempfile.TemporaryDirectory() as work:
        # This checkout first, then whatever the caller's path holds (packages installed beside it).
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run([*ENTRY_POINTS[args.entry], *args.flags], cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        load_after = os.getloadavg()
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        metrics = [json.loads(line) for line in (Path(work) / "outputs" / "default" / "metrics.jsonl").read_text().splitlines()]
    import torch
    import transformers

    report = proc.stdout[proc.stdout.index("training finished") :].strip()
    process = [line.split("process: ", 1)[1] for line in proc.stderr.splitlines() if "process: " in line]
    command = {"python": "python -m mmtrain.train", "accelerate": "accelerate launch mmtrain/train.py"}.get(
        args.entry, f"python -c {CPU_FLOAT8!r}"
    )
    flags = " ".join(args.flags)
    result = {
        "command": f"{command} {flags}  (run from an empty folder)" if flags else f"{command}  (no flags, run from an empty folder)",
        "process": process[0] if process else None,
        "wall_seconds": round(seconds, 1),
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),  # the run's threads: "process"
                   "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "git_commit": os.environ.get("MMTRAIN_CODE_COMMIT")
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "final_report": report,
        "eval": [m for m in metrics if m["split"] == "eval"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(report)
    print(f"wall {seconds:.0f} s, peak RSS {result['peak_rss_gib']} GiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
