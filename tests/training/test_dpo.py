"""``--objective dpo`` through the real entry point on the tiny presets.

The first step's policy is its reference, so every margin is exactly 0: loss log 2 and
accuracy 50% (a tie counts half). Anything else means the reference is not the starting
model (a swap that leaks, adapters left on). Unsupported combinations stop before any
weights load, naming the flag.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mmtrain.args import ConfigError, parse_args

from .conftest import common_flags, kill_and_resume, launch, metrics

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
        # the vision tower's LoRA switched off too: the reference encodes the images itself
        {"vis_lora_dim": 4, "dpo_loss": "length_normalized"},
        # whole pairs packed into one row per micro-batch, by both answers' tokens
        {"max_tokens_per_batch": 512, "gradient_accumulation_steps": 2},
        {"lang_lora_dim": 0, "lm_training": "full"},  # the reference: a frozen copy of the LM's starting weights
    ],
    ids=["lora", "projector_ipo_sft", "vision_lora", "token_budget", "full_lm"],
)
def test_dpo_trains_from_a_reference_equal_to_the_starting_model(model_folders, data_path, tmp_path, extra):
    out = tmp_path / "run"
    proc = launch(_flags(model_folders, data_path, out, **extra), launcher_flags=FP32)
    assert "DPO reference: the starting model" in proc.stdout + proc.stderr
    if "max_tokens_per_batch" in extra:
        assert "packs whole pairs (both answers) into one row" in proc.stdout + proc.stderr
    if extra.get("lm_training") == "full":
        assert "a frozen copy of the" in proc.stdout + proc.stderr and "LM tensors that train" in proc.stdout + proc.stderr
    records = metrics(out)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    first = train[0]
    assert first["step"] == 1
    assert first["margin"] == 0.0 and first["accuracy"] == 0.5
    assert first["rewards_chosen"] == 0.0 and first["rewards_rejected"] == 0.0
    if extra.get("dpo_loss") != "ipo":  # sigmoid of a zero margin, per answer or per token
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


def test_cached_vision_features_train_the_same_pairs_as_encoding_each_epoch(model_folders, data_path, tmp_path):
    """The frozen tower's features, cached in the first epoch, serve both passes of every pair in the second."""
    runs = {}
    for cache in ("false", "true"):
        out = tmp_path / f"cache_{cache}"
        flags = _flags(model_folders, data_path, out, cache_vision_features=cache, max_steps=-1, num_train_epochs=2, eval_steps=0)
        proc = launch(flags, launcher_flags=FP32)
        runs[cache] = [r["loss"] for r in metrics(out) if r["split"] == "train"]
        if cache == "true":
            assert "vision feature cache in memory" in proc.stdout + proc.stderr
    assert len(runs["true"]) == 16  # 32 training pairs, 4 a step, two epochs
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_shared_prompt_and_compiled_layers_train_the_same_pairs_as_the_halves(model_folders, data_path, tmp_path):
    """Each pair's prompt once (the default) logs the metrics of its two halves as rows, step by step and at eval
    (fp32: only the order of sums differs); compiled decoder layers, which run the reference
    (adapters off, no gradients) and the policy as separate graphs, log them too."""
    runs, logs = {}, {}
    for name, extra in (("halves", {"dpo_share_prompt": "false"}), ("shared", {}), ("compiled", {"torch_compile": "true"})):
        out = tmp_path / name
        proc = launch(_flags(model_folders, data_path, out, max_steps=3, eval_steps=3, **extra), launcher_flags=FP32)
        runs[name], logs[name] = metrics(out), proc.stdout + proc.stderr
    assert "each pair's prompt is computed once" in logs["shared"] and "each pair's prompt is computed once" not in logs["halves"]
    assert "LM decoder layers compiled" in logs["compiled"]
    expected = runs["halves"]
    assert any(r["margin"] != 0.0 for r in expected if r["split"] == "train")
    for name, tolerance in (("shared", 1e-5), ("compiled", 2e-3)):
        assert [(r["split"], r["step"]) for r in runs[name]] == [(r["split"], r["step"]) for r in expected]
        for want, got in zip(expected, runs[name]):
            for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", *_accuracy_unless_tied(want)):
                assert got[key] == pytest.approx(want[key], rel=tolerance, abs=1e-6), (name, got["split"], got["step"], key)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--packing", "true"], "--packing does not apply to --objective dpo: pairs are packed whole"),
        (["--dataset_concatenate_samples", "2"], "--dataset_concatenate_samples does not apply to --objective dpo"),
        (["--streaming", "true", "--eval_dataset_names", "synthetic_pairs", "--max_steps", "4", "--precompute_ref", "true"],
         "--precompute_ref keeps each training pair's reference values by its index"),
        (["--dpo_beta", "0"], "--dpo_beta must be > 0"),
        (["--dpo_loss", "hinge"], "--dpo_loss"),
        (["--objective", "sft", "--dpo_beta", "0.5"], "--dpo_beta applies to --objective dpo only"),
        (["--objective", "sft", "--dpo_loss", "ipo"], "--dpo_loss applies to --objective dpo only"),
        (["--objective", "sft", "--precompute_ref", "true"], "--precompute_ref applies to --objective dpo only"),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_flag(model_folders, flags, message):
    argv = ["--lm_model_name_or_path", str(model_folders["tiny-llama"]), "--vision_model_name_or_path", str(model_folders["tiny-clip"]),
            "--dataset_names", "synthetic_pairs", "--objective", "dpo", "--lang_lora_dim", "4", *flags]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_args(argv)


def test_zero3_secondary_partitions_are_refused_before_weights_load(model_folders, data_path, tmp_path):
    """ZeRO++'s secondary partitions (hpZ) would keep the reference's gathered weights for the policy's backward."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2},
    }))
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds}\n  zero3_init_flag: true\n"
        "num_machines: 1\nnum_processes: 1\nmachine_rank: 0\nuse_cpu: false\n"
    )
    proc = launch(_flags(model_folders, data_path, tmp_path / "z3"), config=str(config), check=False)
    assert proc.returncode != 0
    assert "--objective dpo at ZeRO-3 does not support zero_hpz_partition_size > 1" in proc.stderr and "--config_file" in proc.stderr
    assert "DPO reference" not in proc.stderr + proc.stdout  # stopped before the model was built


@pytest.mark.slow
def test_zero3_trains_the_same_pairs_as_zero2(model_folders, data_path, tmp_path):
    """Two processes, the LM's own weights trained: at ZeRO-3 each process swaps its share of every trained
    tensor (the LM's partitioned weights and the small ones ZeRO-3 keeps gathered) for the reference.

    Losses, rewards and margins of every step and eval equal ZeRO-2's, where the reference
    swaps whole tensors (fp32: only the reductions' order differs). A reference that read
    weights still gathered from the other pass would log other rewards from step 3 on.
    With --precompute_ref at ZeRO-3 too: the table the two processes make together gives
    the same numbers as the reference's forward in every step.
    """
    runs = {}
    for config, precompute in (("zero2", False), ("zero3", False), ("zero3", True)):
        out = tmp_path / f"{config}_{precompute}"
        flags = _flags(
            model_folders, data_path, out, lang_lora_dim=0, lm_training="full", per_device_train_batch_size=2,
            precompute_ref=str(precompute).lower(),
        )
        proc = launch(flags, config=f"{config}.yaml", num_processes=2, launcher_flags=FP32)
        runs[config, precompute] = metrics(out)
        log = proc.stdout + proc.stderr
        if config == "zero3":
            assert "this process's ZeRO-3 shares) swapped for their starting copies" in log
        if precompute:  # the two processes share the pairs out and each gets every row
            assert "DPO reference log-probabilities precomputed for 32 train, 8 eval pairs" in log
    expected = runs["zero2", False]
    assert any(r["margin"] != 0.0 for r in expected if r["split"] == "train")  # the policy moved
    for run in (runs["zero3", False], runs["zero3", True]):
        assert [(r["split"], r["step"]) for r in run] == [(r["split"], r["step"]) for r in expected]
        for two, three in zip(expected, run):
            for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", *_accuracy_unless_tied(two)):
                assert three[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), (three["split"], three["step"], key)


def _accuracy_unless_tied(record: dict) -> tuple[str, ...]:
    """``("accuracy",)`` unless the margins are ties (the policy still its reference): fp32 rounding then decides a pair's side."""
    return ("accuracy",) if abs(record["margin"]) > 1e-4 else ()


@pytest.mark.slow
def test_the_tiny_recipe_after_the_embedded_default_prefers_the_right_answers(default_run, tmp_path):
    """recipes/tiny/dpo.yaml as its header runs it, from the default run's last checkpoint: held-out accuracy 50% -> >= 90%."""
    folder, proc = default_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    start = folder / "outputs" / "default" / "checkpoints" / "step-00002028"
    assert start.is_dir(), sorted(p.name for p in start.parent.iterdir())
    out = tmp_path / "dpo"
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "dpo.yaml"
    proc = launch(
        ["--config", str(recipe), "--init_from", str(start), "--output_dir", str(out), "--data_path", str(tmp_path / "data"), "--logging_steps", "1"],
        config="single_process.yaml",
    )
    log = proc.stdout + proc.stderr
    assert "took projector: 4 tensors" in log and "lm_lora:" in log  # the supervised model is the start
    assert "DPO reference: the starting model" in log and "swapped for their starting copies" in log
    records = metrics(out)
    first = next(r for r in records if r["split"] == "train")
    assert first["step"] == 1 and first["accuracy"] == 0.5 and first["margin"] == 0.0  # the policy starts as its reference
    final = [r for r in records if r["split"] == "eval"][-1]
    assert final["pairs"] >= 100
    assert final["accuracy"] >= 0.9, [(r["step"], r["accuracy"]) for r in records if r["split"] == "eval"]
    assert final["rewards_chosen"] > final["rewards_rejected"]


@pytest.mark.slow
def test_accumulated_batches_and_two_processes_at_zero2_train_the_same_first_step_as_one_batch(model_folders, data_path, tmp_path, run_main):
    """8 pairs in one optimizer step: one batch; batches of 3, 3 and 2 accumulated; two DeepSpeed ZeRO-2 processes.

    The step's loss is the mean over its pairs however they are batched (a mean of
    per-batch means would weigh the last two pairs more), and the reference swap works
    inside DeepSpeed's engine: the same gradient and held-out metrics after the step.
    Every first-step loss is log 2 (policy = reference); the gradient tells them apart.
    """
    def flags(out, **extra):
        return _flags(
            model_folders, data_path, out, synthetic_num_samples=10, eval_ratio=0.2, max_steps=-1, num_train_epochs=1,
            eval_steps=0, save_steps=0, lr_scheduler_type="constant", num_warmup_steps=0, **extra,
        )

    one, accumulated, two = tmp_path / "one", tmp_path / "accumulated", tmp_path / "two"
    run_main(flags(one, per_device_train_batch_size=8))
    run_main(flags(accumulated, per_device_train_batch_size=3, gradient_accumulation_steps=3))
    launch(flags(two, per_device_train_batch_size=2, gradient_accumulation_steps=2), config="zero2.yaml", num_processes=2, launcher_flags=FP32)
    (reference,) = [r for r in metrics(one) if r["split"] == "train"]
    reference_eval = [r for r in metrics(one) if r["split"] == "eval"][-1]
    assert reference["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for out in (accumulated, two):
        (step,) = [r for r in metrics(out) if r["split"] == "train"]
        assert step["samples_per_step"] == 8, out.name
        assert step["loss"] == pytest.approx(reference["loss"], rel=1e-6), out.name
        assert step["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5), out.name
        evaluation = [r for r in metrics(out) if r["split"] == "eval"][-1]
        assert evaluation["pairs"] == reference_eval["pairs"] == 2
        assert evaluation["loss"] == pytest.approx(reference_eval["loss"], rel=1e-5), out.name
        for key in ("margin", "rewards_chosen"):  # differences of whole answers' log-probabilities: fp32 rounding of those
            assert evaluation[key] == pytest.approx(reference_eval[key], abs=1e-5), (out.name, key)


def test_a_dpo_run_killed_after_a_checkpoint_resumes_with_the_same_reference_and_metrics(model_folders, data_path, tmp_path):
    """SIGKILL after step 5's checkpoint, resume: steps 6-16 (into the second epoch) log the
    uninterrupted run's losses, rewards and margins exactly. The reference is rebuilt from the
    starting weights, not from the checkpoint's trained ones (which would zero every margin)."""

    def flags(out, **extra):
        return _flags(model_folders, data_path, out, max_steps=-1, num_train_epochs=2, eval_steps=0, save_steps=5, **extra)

    reference, out, log = kill_and_resume(flags, tmp_path, 5, config="zero2.yaml", launcher_flags=FP32)
    assert "resum" in log.lower()

    def train(folder):
        return {r["step"]: r for r in metrics(folder) if r["split"] == "train"}

    expected, resumed = train(reference), train(out)
    assert sorted(resumed) == list(range(1, 17)) and sorted(expected) == list(range(1, 17))
    for step in range(6, 17):
        for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy"):
            assert resumed[step][key] == expected[step][key], (step, key, resumed[step][key], expected[step][key])
    assert any(expected[step]["margin"] != 0.0 for step in range(6, 17))


def test_precomputed_reference_trains_as_the_live_one_and_resumes_exactly(model_folders, data_path, tmp_path):
    """--precompute_ref with the LM's own weights trained (the frozen copy freed once the table is made).

    Its losses, rewards and margins are those of the reference's forward in each step (the
    table's batches differ, so equal to fp32 rounding); SIGKILLed after step 3's checkpoint
    and resumed, the run reads the checkpoint's table and logs the uninterrupted run's
    values exactly into the second epoch.
    """

    def flags(out, precompute="true", **extra):
        return _flags(
            model_folders, data_path, out, lang_lora_dim=0, lm_training="full", synthetic_num_samples=20, max_steps=-1,
            num_train_epochs=2, eval_steps=0, save_steps=3, precompute_ref=precompute, **extra,
        )

    live = tmp_path / "live"
    launch(flags(live, precompute="false"), config="zero2.yaml", launcher_flags=FP32)
    reference, out, log = kill_and_resume(flags, tmp_path, 3, config="zero2.yaml", launcher_flags=FP32)
    assert "DPO reference log-probabilities read from" in log and "precomputed for" not in log
    assert all((folder / "reference_logps.pt").is_file() for folder in (out / "checkpoints").glob("step-*")), "each checkpoint keeps the table"

    def by_step(folder, split="train"):
        return {r["step"]: r for r in metrics(folder) if r["split"] == split}

    expected, precomputed, resumed = by_step(live), by_step(reference), by_step(out)
    assert sorted(expected) == sorted(precomputed) == sorted(resumed) == list(range(1, 9))  # 16 pairs, 4 a step, two epochs
    assert precomputed[1]["margin"] == 0.0 and precomputed[1]["accuracy"] == 0.5  # the table is the starting policy's
    assert any(expected[step]["margin"] != 0.0 for step in range(4, 9))
    keys = ("loss", "rewards_chosen", "rewards_rejected", "margin")
    for step in range(1, 9):
        for key in (*keys, *_accuracy_unless_tied(expected[step])):
            assert precomputed[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    for step in range(4, 9):
        for key in (*keys, "accuracy"):
            assert resumed[step][key] == precomputed[step][key], (step, key, resumed[step][key], precomputed[step][key])
    evals = by_step(live, "eval"), by_step(reference, "eval")
    assert sorted(evals[0]) == sorted(evals[1]) == [4, 8]
    for step in (4, 8):
        assert evals[1][step]["margin"] == pytest.approx(evals[0][step]["margin"], abs=1e-5)
