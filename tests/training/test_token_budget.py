"""Micro-batches by token budget through the real entry point.

One optimizer step of budgeted micro-batches, accumulated on two DeepSpeed processes with
MMCA, gives the loss and gradient of one padded batch of the same samples; a run killed
mid-epoch resumes to the uninterrupted run's losses; the flags that cannot go together
are refused.
"""

from __future__ import annotations

import pytest

from mmtrain.args import ConfigError, parse_args

from .conftest import common_flags, kill_after_checkpoint, launch, metrics, train_losses

pytestmark = pytest.mark.slow

FP32 = ("--mixed_precision", "no")  # the equality below is to fp32 rounding


def _budget_with_an_even_plan(model_folders, data_path, num_samples: int):
    """A budget whose epoch 0 is an even number (>= 6) of micro-batches, the training set and that plan (seed 42)."""
    from mmtrain.args import DataArguments, ModelArguments
    from mmtrain.data import build_datasets
    from mmtrain.data.token_budget import TokenBudgetBatchSampler
    from mmtrain.model import build_model

    built = build_model(ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"]))
    for budget in range(700, 1400, 20):
        args = DataArguments(data_path=str(data_path), synthetic_num_samples=num_samples, max_tokens_per_batch=budget)
        train = build_datasets(args, built.tokenizer, built.image_processor, built.image_tokens, seed=42).train
        plan = TokenBudgetBatchSampler(train, budget, None, seed=42).plan(0)
        if len(plan) % 2 == 0 and len(plan) >= 6:
            return budget, train, plan
    pytest.fail("no budget gives an even number of micro-batches")


def test_budgeted_accumulated_step_on_two_processes_equals_one_padded_batch(model_folders, data_path, tmp_path):
    # Both processes take half of an even number of micro-batches in one optimizer step
    # (gradient accumulation over all of a process's micro-batches), and no sample is
    # repeated to even the processes out.
    budget, train, plan = _budget_with_an_even_plan(model_folders, data_path, 48)
    label_counts = {sum(int((train[i]["labels"][1:] != -100).sum()) for i in batch) for batch in plan}
    assert len(label_counts) > 1  # micro-batches differ in answer tokens: a mean of means would differ

    common = dict(synthetic_num_samples=48, max_steps=1, eval_generate=0, export_each_epoch="false", enable_mmca_attention="true")
    budgeted = tmp_path / "budget"
    launch(
        common_flags(model_folders, data_path, output_dir=budgeted, max_tokens_per_batch=budget, gradient_accumulation_steps=len(plan) // 2, **common),
        config="zero2.yaml", num_processes=2, launcher_flags=FP32,
    )
    padded = tmp_path / "padded"
    launch(common_flags(model_folders, data_path, output_dir=padded, per_device_train_batch_size=len(train), **common), config="single_process.yaml")

    (step_b,) = [r for r in metrics(budgeted) if r["split"] == "train"]
    (step_p,) = [r for r in metrics(padded) if r["split"] == "train"]
    assert step_b["samples_per_step"] == step_p["samples_per_step"] == len(train)
    assert step_b["tokens_per_step"] == step_p["tokens_per_step"]
    assert step_b["loss"] == pytest.approx(step_p["loss"], rel=1e-6)
    assert step_b["grad_norm"] == pytest.approx(step_p["grad_norm"], rel=1e-6)  # a mean of means: 2e-3 off
    # the same update: the model after the step scores the held-out answers alike
    (eval_b,) = [r for r in metrics(budgeted) if r["split"] == "eval"]
    (eval_p,) = [r for r in metrics(padded) if r["split"] == "eval"]
    assert eval_b["loss"] == pytest.approx(eval_p["loss"], rel=1e-6)


def test_killed_mid_epoch_and_resumed_budget_run_gives_the_same_losses(model_folders, data_path, tmp_path):
    def flags(out, **extra):
        return common_flags(
            model_folders, data_path, output_dir=out, synthetic_num_samples=48, max_tokens_per_batch=400, gradient_accumulation_steps=2,
            num_train_epochs=2, save_steps=3, eval_generate=0, export_each_epoch="false", **extra,
        )

    full = tmp_path / "full"
    launch(flags(full), config="single_process.yaml")
    train = [r for r in metrics(full) if r["split"] == "train"]
    assert train[2]["epoch"] < 1 <= train[-1]["epoch"]  # killed inside epoch 0, resumed across the epoch boundary
    # the schedule counted the optimizer steps the two epochs' budgets made: the cosine ends at the last one
    lrs = [r["lr_decay"] for r in train]
    assert lrs[-1] == 0 and min(lrs[:-1]) > 0
    reference = train_losses(full)

    out = tmp_path / "run"
    proc = launch(flags(out), config="single_process.yaml", background=True)
    checkpoint = kill_after_checkpoint(proc, out, 3)
    launch(flags(out, resume_from_checkpoint=checkpoint), config="single_process.yaml")  # the named one, not "latest"
    resumed = train_losses(out)
    assert sorted(resumed) == sorted(reference)
    for step in range(4, max(reference) + 1):
        assert resumed[step] == reference[step], step


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max_tokens_per_batch", "4096", "--per_device_train_batch_size", "8"], r"--max_tokens_per_batch 4096 sizes each micro-batch by tokens and would win over --per_device_train_batch_size"),
        (["--max_images_per_batch", "4"], r"--max_images_per_batch is a limit of --max_tokens_per_batch batches"),
        (["--max_tokens_per_batch", "4096", "--packing", "true"], r"drop --packing"),
        (["--max_tokens_per_batch", "4"], r"--max_tokens_per_batch must be >= 8"),
    ],
)
def test_budget_flags_that_cannot_go_together(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_budget_and_batch_size_in_a_config_file_are_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("per_device_train_batch_size: 8\nmax_tokens_per_batch: 4096\n")
    with pytest.raises(ConfigError, match="drop --per_device_train_batch_size"):
        parse_args(["--config", str(path)])


def test_packed_rows_take_the_offsets_on_cuda_and_flex_attention_where_flash_attention_cannot_run(monkeypatch):
    from types import SimpleNamespace

    import torch

    from mmtrain.args import DataArguments, TrainArguments
    from mmtrain.model import varlen_attention
    from mmtrain.training.speedups import packed_attention

    cuda, cpu = (SimpleNamespace(device=torch.device(d), mixed_precision="bf16") for d in ("cuda", "cpu"))
    budget, auto = DataArguments(max_tokens_per_batch=4096), TrainArguments()
    monkeypatch.setattr(varlen_attention, "flash_attention_problem", lambda device, dtype: None)
    assert packed_attention(cuda, budget, auto) == "flash_varlen"
    monkeypatch.setattr(varlen_attention, "flash_attention_problem", lambda device, dtype: f"{device.type} {dtype}")
    assert packed_attention(cuda, budget, auto) == "flex_attention"
    assert packed_attention(cpu, budget, auto) is None  # SDPA's mask: flex attention has no CPU backward
    assert packed_attention(cuda, DataArguments(), auto) is None  # padded batches keep SDPA's causal kernel
    assert packed_attention(cuda, budget, TrainArguments(packed_attention="sdpa")) is None
    assert packed_attention(cuda, budget, TrainArguments(packed_attention="flash_varlen")) == "flash_varlen"  # as asked
    assert packed_attention(cpu, budget, TrainArguments(packed_attention="flex_attention")) is None


def test_packed_attention_is_a_flag_checked_before_any_weights(tmp_path):
    from typing import get_args, get_type_hints

    from mmtrain.args import TrainArguments
    from mmtrain.model.attention import PACKED_CHOICES

    assert set(get_args(get_type_hints(TrainArguments)["packed_attention"])) == set(PACKED_CHOICES)
    flags = ["--lm_model_name_or_path", "tiny-llama", "--vision_model_name_or_path", "tiny-clip", "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="--packed_attention flex_attention chooses the attention of --max_tokens_per_batch"):
        parse_args([*flags, "--packed_attention", "flex_attention"])
    with pytest.raises(ConfigError, match="--packed_attention"):
        parse_args([*flags, "--max_tokens_per_batch", "512", "--packed_attention", "flash"])
    _, _, train_args = parse_args([*flags, "--max_tokens_per_batch", "512", "--packed_attention", "sdpa"])
    assert train_args.packed_attention == "sdpa"
