"""What a run leaves behind and prints: metrics without duplicates after a kill, one console line per save.

Runs go through the real entry point (``accelerate launch mmtrain/train.py``) on the tiny models.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmtrain.training.metrics import MetricsLogger

from .conftest import common_flags, kill_group, launch, metrics

# Lines Accelerate, huggingface_hub and transformers print for every file of a save.
CHATTER = (
    "Saving current state",
    "Model weights saved",
    "Optimizer state saved",
    "Scheduler state saved",
    "Sampler state",
    "Random states saved",
    "Model weights successfully saved",
    "Writing model shards",
    "Saving DeepSpeed Model",
)
LR_WARNING = "lr_scheduler.step()"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def _segments(text: str) -> list[str]:
    """What a terminal shows: lines, each cut at carriage returns (a progress bar redraws its line)."""
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


# -- metrics.jsonl ------------------------------------------------------------------


def _logger(tmp_path) -> MetricsLogger:
    return MetricsLogger(SimpleNamespace(is_main_process=True), str(tmp_path), tensorboard=False)


def test_rewind_keeps_the_records_a_checkpoint_counted(tmp_path):
    logger = _logger(tmp_path)
    for step in (1, 2, 3):
        logger.log("train", step, step / 10, {"loss": 1.0})
    logger.log("eval", 3, 0.3, {"loss": 1.0})
    counted = logger.records
    assert counted == 4
    logger.log("train", 4, 0.4, {"loss": 1.0})  # written after the checkpoint, before a kill

    resumed = _logger(tmp_path)
    assert resumed.rewind(counted, step=3) == 1
    assert [(r["split"], r["step"]) for r in metrics(tmp_path)] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    resumed.log("train", 4, 0.4, {"loss": 1.0})
    assert resumed.records == 5 and len(metrics(tmp_path)) == 5


def test_rewind_without_a_count_drops_steps_after_the_checkpoint(tmp_path):
    logger = _logger(tmp_path)
    for step in (1, 2, 3, 4, 5):
        logger.log("train", step, step / 10, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a line cut off by the kill
    assert _logger(tmp_path).rewind(None, step=3) == 3
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]


def test_rewind_to_zero_and_a_missing_file(tmp_path):
    logger = _logger(tmp_path)
    assert logger.rewind(0, step=0) == 0 and not (tmp_path / "metrics.jsonl").exists()
    logger.log("train", 1, 0.1, {"loss": 1.0})
    assert _logger(tmp_path).rewind(0, step=0) == 1 and metrics(tmp_path) == []


STEPS = 12
SAVE_EVERY = 3


def _flags(model_folders, data_path, out, **extra):
    return common_flags(model_folders, data_path, output_dir=out, max_steps=STEPS, save_steps=SAVE_EVERY, save_total_limit=10, **extra)


def _kill_after_a_record_past(proc, out: Path, step: int, timeout: float = 600) -> None:
    """SIGKILL the run once checkpoint ``step`` is complete and a record of a later step is in metrics.jsonl."""
    checkpoint = out / "checkpoints" / f"step-{step:08d}" / "manifest.json"
    path = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while True:
        if checkpoint.exists() and path.exists() and any(r["step"] > step for r in _complete_records(path)):
            break
        if proc.poll() is not None:
            break  # ended on its own: its file holds every later record, which is the case tested as well
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the checkpoint")
        time.sleep(0.01)
    kill_group(proc)


def _complete_records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # being written
    return records


@pytest.mark.slow
def test_killed_after_a_log_line_and_resumed_writes_each_record_once(model_folders, data_path, tmp_path):
    reference = tmp_path / "reference"
    launch(_flags(model_folders, data_path, reference))
    out = tmp_path / "run"
    proc = launch(_flags(model_folders, data_path, out), background=True)
    _kill_after_a_record_past(proc, out, SAVE_EVERY)
    assert any(r["step"] > SAVE_EVERY for r in _complete_records(out / "metrics.jsonl"))  # what would be written twice

    # resumed from the checkpoint the records overtook (a later one may have been written before the kill)
    checkpoint = out / "checkpoints" / f"step-{SAVE_EVERY:08d}"
    launch(_flags(model_folders, data_path, out, resume_from_checkpoint=checkpoint))
    expected, got = metrics(reference), metrics(out)
    assert [(r["split"], r["step"]) for r in got] == [(r["split"], r["step"]) for r in expected]
    for a, b in zip(expected, got):
        assert a["loss"] == b["loss"], (a, b)


# -- the console ------------------------------------------------------------------


@pytest.mark.slow
def test_one_line_per_checkpoint_and_export_and_log_lines_clear_of_the_progress_bar(model_folders, data_path, tmp_path):
    out = tmp_path / "run"
    # 86 training samples in batches of 4: 22 steps, checkpoints at 5, 10, 15, 20 and the epoch end
    proc = launch(common_flags(model_folders, data_path, output_dir=out, save_steps=5))
    text = proc.stdout + proc.stderr
    lines = _segments(text)
    for step in (5, 10, 15, 20, 22):
        path = str(out / "checkpoints" / f"step-{step:08d}")
        assert len([s for s in lines if path in s]) == 1, (step, [s for s in lines if path in s])
    export = str(out / "epoch-0")
    assert len([s for s in lines if export in s]) == 1, [s for s in lines if export in s]
    for said in CHATTER:
        assert said not in text, said
    assert LR_WARNING not in text
    # every log line starts its own line: none is written onto the end of the progress bar's
    logged = [s for s in lines if "[train] step" in s or "[eval] step" in s or "checkpoint " in s]
    assert len([s for s in logged if "[train] step" in s]) == 22
    assert all(LOG_LINE.match(s) for s in logged), [s for s in logged if not LOG_LINE.match(s)][:3]

    # --verbose gives the libraries' lines back
    proc = launch(common_flags(model_folders, data_path, output_dir=tmp_path / "verbose", max_steps=2, eval_generate=0, verbose="true"))
    assert "Saving current state" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_offloaded_optimizer_steps_under_its_schedule_without_a_warning(model_folders, data_path, tmp_path):
    """With optimizer offload, Accelerate's prepare would swap in a new CPU Adam and leave the schedule on one that never steps."""
    out = tmp_path / "run"
    proc = launch(
        common_flags(model_folders, data_path, output_dir=out, max_steps=3, eval_generate=0, num_warmup_steps=0, lr_scheduler_type="linear"),
        config="zero2_offload.yaml",
        num_processes=2,
    )
    text = proc.stdout + proc.stderr
    assert LR_WARNING not in text, [s for s in _segments(text) if LR_WARNING in s]
    # the logged rates follow the linear decay from 1e-3 over 3 steps, read after each step
    rates = [r["lr_decay"] for r in metrics(out) if r["split"] == "train"]
    assert rates == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])
    assert len([s for s in _segments(text) if str(out / "checkpoints" / "step-00000003") in s]) == 1
