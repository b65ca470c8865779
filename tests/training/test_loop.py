"""The training loop, run in-process on the tiny models: what it logs, evaluates, checkpoints and exports."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest
import torch

from mmtrain.training.loop import print_final_report

from .conftest import common_flags, metrics, train_losses

# 48 generated samples: 43 train after the 10% eval split, 11 batches of 4 an epoch.
SAMPLES = 48
# A constant rate: a run's schedule would otherwise depend on its length, and runs of
# different lengths could not be compared step by step.
SCHEDULE = dict(synthetic_num_samples=SAMPLES, lr_scheduler_type="constant", num_warmup_steps=0)


@pytest.fixture
def train(monkeypatch, model_folders, data_path):
    """train(output_dir, **flags) -> the result dict of ``mmtrain.train.main`` in this process."""
    from accelerate.state import AcceleratorState, GradientState

    from mmtrain.train import main

    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what main sets on CPU; undone after the test

    def run(out, **flags):
        try:
            return main(common_flags(model_folders, data_path, output_dir=out, **SCHEDULE, **flags))
        finally:
            # the Accelerator's state is process-wide: leave none behind for the next run
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    return run


def test_an_epoch_logs_every_step_evaluates_checkpoints_and_exports(train, tmp_path, capsys):
    from mmtrain.model.pretrained import load_pretrained

    out = tmp_path / "run"
    result = train(out)
    steps = result["global_step"]
    assert steps == 11 and result["epoch"] == 1

    records = metrics(out)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train_records)
    assert train_records[-1]["epoch"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in train_records)
    # the end of the epoch is evaluated once, and the result is the last eval
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [steps]
    assert math.isfinite(evals[0]["loss"]) and evals[0]["questions"] == 4
    assert result["eval_loss"] == evals[0]["loss"] and result["eval_exact_match"] == evals[0]["exact_match"]

    # the checkpoint at the epoch end resumes at the start of the next epoch
    checkpoint = out / "checkpoints" / f"step-{steps:08d}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, steps)
    assert state["best_eval_loss"] == evals[0]["loss"]
    assert (checkpoint / "manifest.json").is_file()

    export = out / "epoch-0"
    assert (export / "mmtrain_config.json").is_file() and (export / "projector.safetensors").is_file()
    assert (export / "language_model" / "config.json").is_file() and (export / "vision_encoder" / "config.json").is_file()
    load_pretrained(str(export))  # strict: every tensor present, none unexpected

    report = capsys.readouterr().out
    assert f"training finished at step {steps}\n  eval loss {evals[0]['loss']:.4f}" in report


def _answer_tokens_per_step(model_folders, data_path, out) -> dict[int, int]:
    """Answer tokens each optimizer step of a ``--record_samples`` run trained on (the generated set of SCHEDULE, seed 42)."""
    from mmtrain.args import DataArguments, ModelArguments
    from mmtrain.data import build_datasets
    from mmtrain.model import build_model

    built = build_model(ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"]))
    args = DataArguments(data_path=str(data_path), synthetic_num_samples=SAMPLES)
    train_set = build_datasets(args, built.tokenizer, built.image_processor, built.image_tokens, seed=42).train
    tokens: dict[int, int] = {}
    for line in (out / "samples" / "rank-0.jsonl").read_text().splitlines():
        record = json.loads(line)
        tokens[record["step"]] = tokens.get(record["step"], 0) + sum(int((train_set[i]["labels"][1:] != -100).sum()) for i in record["indices"])
    return tokens


def test_logged_loss_is_the_mean_of_the_steps_since_the_last_line(train, tmp_path, model_folders, data_path):
    train(tmp_path / "every", logging_steps=1, max_steps=7, record_samples="true")
    every = train_losses(tmp_path / "every")
    # the mean over the window's answer tokens, as each step's loss is over its own
    tokens = _answer_tokens_per_step(model_folders, data_path, tmp_path / "every")
    assert len(set(tokens.values())) > 1  # steps differ in answer tokens: a plain mean of their losses would differ

    def token_mean(steps):
        return sum(every[s] * tokens[s] for s in steps) / sum(tokens[s] for s in steps)

    third = train(tmp_path / "third", logging_steps=3, max_steps=7)
    assert third["global_step"] == 7
    logged = train_losses(tmp_path / "third")
    assert sorted(logged) == [3, 6, 7]  # step 7 ends the run: its window of one step is logged too
    assert logged[3] == pytest.approx(token_mean([1, 2, 3]), rel=1e-5)
    assert logged[6] == pytest.approx(token_mean([4, 5, 6]), rel=1e-5)
    assert logged[7] == pytest.approx(every[7], rel=1e-5)
    # tokens_seen counts every step's tokens, the last window's included, and the checkpoint holds the same count
    records = [r for r in metrics(tmp_path / "every") if r["split"] == "train"]
    assert [r["tokens_seen"] for r in records] == list(itertools.accumulate(round(r["tokens_per_step"]) for r in records))
    third_records = [r for r in metrics(tmp_path / "third") if r["split"] == "train"]
    assert third_records[-1]["tokens_seen"] == records[-1]["tokens_seen"]

    # --max_steps stopped it inside the epoch: a checkpoint there, an eval, no export
    state = json.loads((tmp_path / "third" / "checkpoints" / "step-00000007" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 7, 7)
    assert state["tokens_seen"] == records[-1]["tokens_seen"]
    assert [r["step"] for r in metrics(tmp_path / "third") if r["split"] == "eval"] == [7]
    assert not (tmp_path / "third" / "epoch-0").exists()


def test_final_report_without_and_with_eval(capsys):
    print_final_report({"global_step": 12, "epoch": 1})
    assert capsys.readouterr().out == "training finished at step 12\n"
    print_final_report(
        {
            "global_step": 5, "epoch": 0, "eval_loss": 1.234567, "eval_perplexity": 3.43675, "eval_label_tokens": 40,
            "eval_exact_match": 0.5, "eval_majority_baseline": 0.25, "eval_questions": 8,
        }
    )
    assert capsys.readouterr().out.splitlines() == [
        "training finished at step 5",
        "  eval loss 1.2346 (perplexity 3.437) over 40 answer tokens",
        "  eval exact match 50.0% on 8 held-out questions (majority-answer baseline 25.0%: the most frequent answer to each question)",
    ]


def test_no_eval_set_is_said_plainly(train, tmp_path, capsys):
    """--eval_ratio 0: no eval loss of 0 over 0 answer tokens, but a line saying there is no eval set."""
    result = train(tmp_path / "run", eval_ratio=0, eval_generate=0, max_steps=2)
    report = capsys.readouterr().out
    assert "eval loss 0.0000" not in report and "no eval loss: no eval set (--eval_ratio 0" in report, report
    assert "eval_loss" not in result and result["eval_label_tokens"] == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["best_eval_loss"] is None


def test_a_log_window_leaves_out_paused_time():
    """tokens_per_s is over training time: eval, exports and checkpoints run paused."""
    from mmtrain.training.loop import _Window

    window = _Window()
    with window.paused():
        time.sleep(0.3)
    window.add(1, 1.0, 1.0, 100, 1)
    *_, seconds = window.drain()
    assert seconds < 0.1


def test_overwrite_output_dir_removes_what_the_earlier_run_wrote_and_nothing_else(train, tmp_path):
    out = tmp_path / "run"
    train(out, enable_tensorboard="true", record_samples="true")  # a whole epoch: checkpoints, epoch-0, metrics, tensorboard, run_config, samples
    assert (out / "epoch-0").is_dir() and (out / "tensorboard").is_dir() and (out / "run_config.json").is_file()
    assert (out / "samples" / "rank-0.jsonl").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "epoch-notes").mkdir()
    (out / "epoch-7.txt").write_text("mine too")

    train(out, overwrite_output_dir="true", max_steps=3)
    # the new run stopped inside its first epoch: an epoch-0 there would be the old model's
    assert not (out / "epoch-0").exists() and not (out / "tensorboard").exists() and not (out / "samples").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    assert [(r["split"], r["step"]) for r in metrics(out)] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert json.loads((out / "run_config.json").read_text())["train_args"]["max_steps"] == 3
    # what the run did not write stays
    assert (out / "notes.txt").read_text() == "mine" and (out / "epoch-notes").is_dir() and (out / "epoch-7.txt").is_file()


def test_a_fresh_start_replaces_the_records_of_a_start_that_left_no_checkpoint(train, tmp_path):
    out = tmp_path / "run"
    train(out, max_steps=2, save_steps=0)
    # as if killed before its first checkpoint: the records stay, no checkpoint does
    import shutil

    shutil.rmtree(out / "checkpoints")
    train(out, max_steps=3)
    assert [(r["split"], r["step"]) for r in metrics(out)] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]


def test_the_first_step_runs_in_training_mode(train, tmp_path, monkeypatch):
    """A language model loaded from a folder arrives in eval mode (``from_pretrained``); what depends on
    the mode (activation checkpointing, dropout, sequence parallelism) must hold from step 1, not from
    the first evaluation."""
    from mmtrain.training.loop import Loop

    seen = []
    step = Loop.train_step

    def recording(self, batch):
        seen.append(all(m.training for m in self.model.modules()))
        return step(self, batch)

    monkeypatch.setattr(Loop, "train_step", recording)
    train(tmp_path / "run", max_steps=2, eval_steps=0, eval_generate=0, export_each_epoch="false")
    assert seen[:2] == [True, True]
