"""One objective, however batches are made, and one decision when it goes non-finite.

The loss of an optimizer step is the mean over every answer token of the step, on every
process and micro-batch: sample batches, token budgets, gradient accumulation and one or
two processes give the same first step when they cover the same samples. Samples whose
answers differ tenfold in length make any mean of per-micro-batch means visibly
different. A NaN loss on one of two DeepSpeed processes stops both, each with the step,
the process and the value, instead of one process leaving the other in a collective.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from .conftest import common_flags, launch, metrics

FP32 = ("--mixed_precision", "no")  # the equalities below are to fp32 rounding
TRAIN = 8  # samples: one optimizer step covers the whole epoch in every layout below

_WORDS = "red green blue one two three four five circle square left right top bottom".split()


def _records(count: int, *, start: int = 0, poison: int | None = None) -> list[dict]:
    """``count`` records, every other one with an image, answers of 1 to ~40 words; record ``poison`` asks about "~~~"."""
    records = []
    for i in range(start, start + count):
        answer = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(1 if i % 2 else 5 * (i % 8) + 2))
        question = "What is shown here ~~~?" if i == poison else f"What is item {i}?"
        record = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
        if i % 2 == 0:
            record["image"] = "img.png"
            record["conversations"][0]["value"] = "<image>\n" + question
        records.append(record)
    return records


def _dataset(folder: Path, train: int, *, poison: int | None = None) -> tuple[Path, Path]:
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (40, 90, 220)).save(folder / "img.png")
    (folder / "train.json").write_text(json.dumps(_records(train, poison=poison)))
    (folder / "eval.json").write_text(json.dumps(_records(4, start=100)))
    return folder / "train.json", folder / "eval.json"


def _flags(model_folders, data_path, train_file: Path, eval_file: Path, out: Path, **extra) -> list[str]:
    flags = common_flags(
        model_folders, data_path, output_dir=out, dataset_names=str(train_file), eval_generate=0, export_each_epoch="false",
        lr_scheduler_type="constant", num_warmup_steps=0, save_steps=0, **extra,
    )
    return flags + ["--eval_dataset_names", str(eval_file)]


def _first_step(out: Path) -> tuple[dict, dict]:
    (step,) = [r for r in metrics(out) if r["split"] == "train"]
    (evaluation,) = [r for r in metrics(out) if r["split"] == "eval"]
    return step, evaluation


@pytest.mark.slow
def test_sample_batches_budgets_accumulation_and_two_processes_train_the_same_first_step(model_folders, data_path, tmp_path, run_main):
    train_file, eval_file = _dataset(tmp_path / "data", TRAIN)
    layouts = {
        "one batch": dict(per_device_train_batch_size=TRAIN),
        # 3 + 3 + 2 samples: the epoch's end closes a step of three micro-batches out of four
        "batches of 3, accumulated": dict(per_device_train_batch_size=3, gradient_accumulation_steps=4),
        "token budget, accumulated": dict(max_tokens_per_batch=400, gradient_accumulation_steps=TRAIN),
    }
    for name, extra in layouts.items():
        run_main(_flags(model_folders, data_path, train_file, eval_file, tmp_path / name, **extra))
    two = tmp_path / "two processes"
    launch(
        _flags(model_folders, data_path, train_file, eval_file, two, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        config="zero2.yaml", num_processes=2, launcher_flags=FP32,  # ZeRO-2 reports the gradient norm
    )

    reference_step, reference_eval = _first_step(tmp_path / "one batch")
    assert reference_step["samples_per_step"] == TRAIN
    budget_step, _ = _first_step(tmp_path / "token budget, accumulated")
    assert budget_step["tokens_per_step"] == reference_step["tokens_per_step"]
    for out in [*(tmp_path / name for name in layouts), two]:
        step, evaluation = _first_step(out)
        assert step["samples_per_step"] == TRAIN, out.name  # the same samples, none twice
        assert step["loss"] == pytest.approx(reference_step["loss"], rel=1e-6), out.name
        # the gradient's size: a mean of per-micro-batch means is several percent off here
        assert step["grad_norm"] == pytest.approx(reference_step["grad_norm"], rel=1e-6), out.name
        # and its direction: the step's update scores the held-out answers alike
        assert evaluation["loss"] == pytest.approx(reference_eval["loss"], rel=1e-6), out.name


def _poisoned_lm(source: str, folder: Path) -> tuple[str, int]:
    """A copy of the tiny LM whose input embedding of "~" is NaN: any sample holding one gets a NaN loss, others do not."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    token = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("~")
    weights = load_file(folder / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder), token


@pytest.mark.slow
def test_a_nan_loss_on_one_process_stops_both_with_the_step_the_process_and_the_value(model_folders, data_path, tmp_path):
    assert_a_nan_on_one_process_stops_both(model_folders, data_path, tmp_path)


def assert_a_nan_on_one_process_stops_both(model_folders, data_path, tmp_path: Path) -> None:
    """Two processes at ZeRO-0 (gloo on CPU, NCCL on GPUs), one sample that makes a NaN loss on one of them: both stop, promptly, saying so."""
    lm, token = _poisoned_lm(model_folders["tiny-llama"], tmp_path / "lm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm)
    assert [tokenizer(r["conversations"][0]["value"])["input_ids"].count(token) for r in _records(3, start=5, poison=5)] == [3, 0, 0]
    train_file, eval_file = _dataset(tmp_path / "data", 16, poison=5)
    flags = _flags(model_folders, data_path, train_file, eval_file, tmp_path / "run", per_device_train_batch_size=2, num_train_epochs=2)
    flags[flags.index("--lm_model_name_or_path") + 1] = lm
    started = time.monotonic()
    # --monitor_interval: the launcher's agent would end the second process as soon as the
    # first exits; given time, each process must stop by itself (as on separate machines).
    proc = launch(flags, config="zero0.yaml", num_processes=2, check=False, timeout=300, launcher_flags=("--monitor_interval", "5"))
    assert time.monotonic() - started < 240, "the processes did not stop promptly"
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    # one line per process (both write to this output, maybe onto one line), the same words
    errors = re.findall(r"error: (loss is nan at step \d+ on process [01] of 2 \(epoch 0\); every process stops here)", log)
    assert len(errors) == 2 and errors[0] == errors[1], log[-6000:]
    assert log.count("exitcode  : 1 ") == 2, log[-3000:]  # each process ended by itself, none by a signal
    # no checkpoint of the bad step or after it was written
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("step-*"))
