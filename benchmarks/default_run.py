"""Time the embedded default run and record what it learned.

    python benchmarks/default_run.py [--out benchmarks/results/default_run_cpu.json]

Runs ``python -m mmtrain.train`` with no flags in a fresh folder (as a new user would),
then writes its wall time, peak memory, every eval record of ``metrics.jsonl`` and the
final printed report, with the machine and versions, to a JSON file.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "default_run_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mmtrain.train"], cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        metrics = [json.loads(line) for line in (Path(work) / "outputs" / "default" / "metrics.jsonl").read_text().splitlines()]
    import torch
    import transformers

    report = proc.stdout[proc.stdout.index("training finished") :].strip()
    result = {
        "command": "python -m mmtrain.train  (no flags, run from an empty folder)",
        "wall_seconds": round(seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
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
