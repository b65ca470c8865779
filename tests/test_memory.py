import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.memory import (
    GiB,
    MemorySetup,
    all_setups,
    estimate,
    lm_layer_activation_bytes,
    model_facts,
    parse_bytes,
    recommend,
    ref_model_args,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ref7b():
    return model_facts(ref_model_args("ref-7b"))


@pytest.fixture(scope="module")
def tiny():
    return model_facts(ModelArguments(lang_lora_dim=4))


def test_counts_are_the_builders(ref7b):
    from mmtrain.model.builder import build_model, count_parameters

    counts = count_parameters(build_model(ref_model_args("ref-7b"), meta=True).model)
    assert ref7b.total() == sum(c.total for c in counts)
    assert ref7b.total(trainable=True) == sum(c.trainable for c in counts)
    vision = next(c for c in counts if c.name == "vision encoder")
    assert ref7b.total(engine=False) == vision.total  # the frozen tower stays outside the engine


def test_model_states_fall_with_each_stage(ref7b):
    base = MemorySetup(num_gpus=8, micro_batch=1)
    states = [estimate(ref7b, replace(base, zero_stage=s)).model_states for s in range(4)]
    assert states[0] > states[1] > states[2] > states[3]
    with_offload = [estimate(ref7b, s).model_states for s in all_setups(base)]
    assert with_offload == sorted(with_offload, reverse=True)


def test_frozen_weights_carry_no_gradients_or_optimizer_states(ref7b):
    est = estimate(ref7b, MemorySetup())
    trainable = ref7b.total(trainable=True)
    assert est.gradients == 2 * trainable
    assert est.optimizer_states == 12 * trainable
    assert est.frozen_weights == 2 * ref7b.total(trainable=False)
    fp32 = estimate(ref7b, MemorySetup(precision="fp32"))
    assert fp32.optimizer_states == 8 * trainable and fp32.step_transient == 0


def test_offload_moves_optimizer_states_to_host(ref7b):
    on_gpu = estimate(ref7b, MemorySetup(zero_stage=2, num_gpus=4))
    off = estimate(ref7b, MemorySetup(zero_stage=2, num_gpus=4, offload="optimizer"))
    assert off.optimizer_states == 0 and off.gradients == 0 and off.step_transient == 0
    assert off.cpu_optimizer_states == on_gpu.optimizer_states
    assert off.frozen_weights == on_gpu.frozen_weights
    params = estimate(ref7b, MemorySetup(zero_stage=3, num_gpus=4, offload="optimizer+params"))
    # Only the replicated vision encoder and the small persistent parameters stay on the GPU.
    assert params.frozen_weights < 2 * ref7b.total(engine=False) + 2 * 10**7
    assert params.cpu_weights > 0


def test_stage3_partitions_engine_weights_by_gpu_count(ref7b):
    one, eight = (estimate(ref7b, MemorySetup(zero_stage=3, num_gpus=n)) for n in (1, 8))
    vision = 2 * ref7b.total(engine=False)
    persistent = 2 * ref7b.persistent(10_000, trainable=False)
    ratio = (one.frozen_weights - vision - persistent) / (eight.frozen_weights - vision - persistent)
    assert ratio == pytest.approx(8, rel=1e-6)
    assert eight.optimizer_states == pytest.approx(one.optimizer_states / 8, rel=1e-6)
    # Below stage 3 the frozen weights do not shrink with more GPUs.
    assert estimate(ref7b, MemorySetup(zero_stage=2, num_gpus=8)).frozen_weights == estimate(ref7b, MemorySetup(zero_stage=2)).frozen_weights


def test_activations_grow_with_tokens_and_shrink_with_checkpointing(ref7b):
    one = estimate(ref7b, MemorySetup(micro_batch=1))
    four = estimate(ref7b, MemorySetup(micro_batch=4))
    assert 3.9 < four.activations / one.activations < 4.1
    ckpt = estimate(ref7b, MemorySetup(micro_batch=4, gradient_checkpointing=True))
    assert ckpt.activations < four.activations / 5
    # Activations do not depend on ZeRO.
    assert estimate(ref7b, MemorySetup(micro_batch=4, zero_stage=3, num_gpus=8)).activations == four.activations


def test_compiled_layers_keep_fewer_activations(ref7b):
    """Norm inputs in the compute dtype and no SiLU output: (41.6 -> 32.2)·s·b·h per layer for 7B shapes."""
    h, i = ref7b.hidden, ref7b.intermediate
    eager = lm_layer_activation_bytes(ref7b, 1, 2)
    compiled = lm_layer_activation_bytes(ref7b, 1, 2, compiled=True)
    assert eager - compiled == 2 * 2 * h + 2 * i
    assert compiled / h == pytest.approx(32.2, abs=0.05) and eager / h == pytest.approx(41.6, abs=0.05)
    # The H200 measurement in the package docstring: ZeRO-2, 2048 tokens, micro-batch 6, 63.5 GiB peak.
    setup = MemorySetup(zero_stage=2, micro_batch=6, compiled=True)
    assert estimate(ref7b, setup).total / 2**30 == pytest.approx(63.5, rel=0.05)
    assert estimate(ref7b, replace(setup, compiled=False)).total / 2**30 > 1.2 * 63.5
    assert setup.name == "zero2+compiled"


def test_logits_only_at_label_positions(ref7b):
    est = estimate(ref7b, MemorySetup(micro_batch=2, seq_len=2048, label_fraction=0.25))
    text = 2048 - (576 + 2)
    assert est.logits == 2 * int(0.25 * text) * 32000 * 10
    assert estimate(ref7b, MemorySetup(label_fraction=0.0)).logits == 0


def test_recommendation_picks_stage0_when_everything_fits(tiny):
    rec = recommend(tiny, MemorySetup(micro_batch=1, seq_len=256), 80 * GiB)
    assert rec.estimate.setup.zero_stage == 0 and not rec.estimate.setup.gradient_checkpointing


def test_recommendation_climbs_the_ladder_when_memory_is_short(ref7b):
    # 7B at batch 4 x 2048 on 24 GiB: the frozen weights fit, the activations only when recomputed.
    rec = recommend(ref7b, MemorySetup(micro_batch=4), 24 * GiB)
    assert rec.estimate.total <= rec.budget
    assert (rec.estimate.setup.zero_stage, rec.estimate.setup.gradient_checkpointing) == (0, True)
    # 13B + ViT-bigG on one 24 GiB GPU: only parameter offload makes room for the frozen weights.
    rec = recommend(ref_model_args("ref-13b"), MemorySetup(micro_batch=1), 24 * GiB)
    assert (rec.estimate.setup.zero_stage, rec.estimate.setup.offload) == (3, "optimizer+params")
    assert recommend(ref7b, MemorySetup(micro_batch=64, seq_len=4096), 24 * GiB).estimate is None


def test_deepspeed_estimator_overstates_model_states(ref7b):
    # It takes all 6.8 B engine parameters as trainable. With offload it can come out lower
    # than ours: it does not know of the vision encoder replicated outside the engine.
    for setup in all_setups(MemorySetup(num_gpus=8)):
        est = estimate(ref7b, setup)
        if setup.zero_stage == 0:
            assert est.deepspeed_model_states is None
        elif setup.offload == "none":
            assert est.deepspeed_model_states > 1.5 * est.model_states, setup.name


def test_invalid_setups_are_refused():
    with pytest.raises(ConfigError):
        MemorySetup(zero_stage=0, offload="optimizer")
    with pytest.raises(ConfigError):
        MemorySetup(zero_stage=2, offload="optimizer+params")
    with pytest.raises(ConfigError):
        MemorySetup(precision="fp8")


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("40GB") == 40 * 10**9
    assert parse_bytes("24G") == 24 * 2**30
    assert parse_bytes("1024") == 1024


def test_cli_prints_a_table(capsys):
    from mmtrain.memory import main

    assert main(["--lang_lora_dim", "4", "--seq_len", "256", "--gpu_memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "zero3+off-opt+par" in out and "recommended for 24.00 GiB GPUs: zero0" in out
    assert main(["--lang_lora_dim", "4", "--gpu_memory", "lots"]) == 2


def test_cli_prints_json():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mmtrain.memory", "--lang_lora_dim", "4", "--num_gpus", "2", "--micro_batch", "2",
           "--seq_len", "256", "--gradient_checkpointing", "--gpu_memory", "24GiB", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [e["name"] for e in data["estimates"]][:2] == ["zero0+ckpt", "zero1+ckpt"]
    assert len(data["estimates"]) == 7
    assert data["recommendation"]["name"] == "zero0"
