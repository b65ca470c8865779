"""Where numbers go: the console, ``metrics.jsonl`` and (optionally) TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger("mmtrain")

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Writes each record to every sink, on the main process only.

    ``metrics.jsonl`` gets one JSON object per line with ``split`` (train / eval),
    ``step`` and ``epoch``. A resumed run first cuts the file back to what it held when
    its checkpoint was written (:meth:`rewind`), then appends: the records of the steps
    it runs again appear once, as in a run that was never interrupted.
    """

    def __init__(self, accelerator, output_dir: str, tensorboard: bool):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.tensorboard = tensorboard
        self.records = 0  # lines of metrics.jsonl (main process), what a checkpoint records

    def rewind(self, records: int | None, step: int) -> int:
        """Keep the first ``records`` records of ``metrics.jsonl``; returns how many were dropped.

        ``records`` is what the file held when the checkpoint being resumed was written (0 for
        a fresh start). A checkpoint older than that count gives None: records after its
        ``step`` are dropped then (a final eval written after its own checkpoint may stay twice).
        """
        if not self.accelerator.is_main_process:
            return 0
        if not os.path.exists(self.path):
            self.records = 0
            return 0
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        if records is None:
            kept = [line for line in lines if _step_of(line) <= step]
        else:
            kept = lines[:records]
        if len(kept) != len(lines):
            # Written aside and renamed: a kill during the rewrite leaves the old file whole.
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self.records = len(kept)
        return len(lines) - len(kept)

    def log(self, split: str, step: int, epoch: float, values: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"split": split, "step": step, "epoch": round(epoch, 4), **values, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.records += 1
        if self.tensorboard:
            self.accelerator.log({f"{split}/{k}": v for k, v in values.items()}, step=step)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        logger.info(f"[{split}] step {step} epoch {epoch:.2f} {shown}")


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # a line cut off by a kill: dropped with what came after the checkpoint


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(output_dir: str) -> list[dict]:
    """All records of a run's ``metrics.jsonl`` (for notebooks and tests)."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
