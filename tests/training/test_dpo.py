"""``--objective dpo`` through the real entry point on the tiny presets.

The first step's policy is its reference, so every margin is exactly 0: loss log 2 and
accuracy 50% (a tie counts half). Anything else means the reference is not the starting
model (a swap that leaks, adapters left on). Unsupported combinations stop before any
weights load, naming the flag.
"""

from __future__ import annotations

import math

import pytest

from mmtrain.args import ConfigError, parse_args

from .conftest import common_flags, launch, metrics

FP32 = ("--mixed_precision", "no")


def _flags(model_folders, data_path, out, **overrides):
    values = dict(
        objective="dpo", dataset_names="synthetic_pairs", synthetic_num_samples=40, eval_ratio=0.2, output_dir=out,
        eval_generate=0, eval_steps=2, export_each_epoch="false", max_steps=4, learning_rate=5e-3, dpo_beta=0.5,
    )
    values.update(overrides)
    return common_flags(model_folders, data_path, **values)


@pytest.mark.parametrize(
    "extra",
    [
        {},  # LoRA (switched off for the reference) and the projector and new rows (swapped)
        {"lang_lora_dim": 0, "lm_training": "frozen", "dpo_loss": "ipo", "dpo_sft_weight": 0.5},  # projector and new rows only
    ],
    ids=["lora", "projector_ipo_sft"],
)
def test_dpo_trains_from_a_reference_equal_to_the_starting_model(model_folders, data_path, tmp_path, extra):
    out = tmp_path / "run"
    proc = launch(_flags(model_folders, data_path, out, **extra), launcher_flags=FP32)
    assert "DPO reference: the starting model" in proc.stdout + proc.stderr
    records = metrics(out)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    first = train[0]
    assert first["step"] == 1
    assert first["margin"] == 0.0 and first["accuracy"] == 0.5
    assert first["rewards_chosen"] == 0.0 and first["rewards_rejected"] == 0.0
    if "dpo_loss" not in extra:
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:  # IPO: (0 - 1 / (2 beta))^2 = 1, plus the SFT term, the chosen answer's per-token NLL
        assert first["loss"] > 1.0
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert any(r["margin"] != 0.0 for r in train[1:])  # the policy moved away from its reference
    assert [r["step"] for r in evals][-1] == 4
    for record in evals:
        assert set(record) >= {"loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "pairs"}
        assert record["pairs"] == 8
    assert "eval preference accuracy" in proc.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lang_lora_dim", "0", "--lm_training", "full"], "--objective dpo keeps no frozen copy of the LM yet"),
        (["--max_tokens_per_batch", "512"], "--max_tokens_per_batch is not supported with --objective dpo yet"),
        (["--packing", "true"], "--packing is not supported with --objective dpo yet"),
        (["--vis_lora_dim", "4"], "--vis_lora_dim is not supported with --objective dpo yet"),
        (["--torch_compile", "true"], "--torch_compile true is not supported with --objective dpo yet"),
        (["--dpo_beta", "0"], "--dpo_beta must be > 0"),
        (["--dpo_loss", "hinge"], "--dpo_loss"),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_flag(model_folders, flags, message):
    argv = ["--lm_model_name_or_path", str(model_folders["tiny-llama"]), "--vision_model_name_or_path", str(model_folders["tiny-clip"]),
            "--dataset_names", "synthetic_pairs", "--objective", "dpo", "--lang_lora_dim", "4", *flags]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_args(argv)


def test_zero3_is_refused_before_weights_load(model_folders, data_path, tmp_path):
    proc = launch(_flags(model_folders, data_path, tmp_path / "z3"), config="zero3.yaml", check=False)
    assert proc.returncode != 0 and "--objective dpo is not supported at ZeRO-3 yet" in proc.stderr
    assert "DPO reference" not in proc.stderr + proc.stdout  # stopped before the model was built
