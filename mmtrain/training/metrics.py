"""Where numbers go: the console, ``metrics.jsonl`` and (optionally) TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger("mmtrain")


class MetricsLogger:
    """Writes each record to every sink, on the main process only.

    ``metrics.jsonl`` gets one JSON object per line with ``split`` (train / eval),
    ``step`` and ``epoch``; a resumed run appends to the same file.
    """

    def __init__(self, accelerator, output_dir: str, tensorboard: bool):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tensorboard = tensorboard

    def log(self, split: str, step: int, epoch: float, values: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"split": split, "step": step, "epoch": round(epoch, 4), **values, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self.accelerator.log({f"{split}/{k}": v for k, v in values.items()}, step=step)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        logger.info(f"[{split}] step {step} epoch {epoch:.2f} {shown}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(output_dir: str) -> list[dict]:
    """All records of a run's ``metrics.jsonl`` (for notebooks and tests)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
