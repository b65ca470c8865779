import json
import math
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


# Full fine-tuning of the LM (LLaVA's stage 2): --lm_training full.

STAGE2_SETUPS = ((2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "optimizer+params"))


def _full_lm(lm: str) -> ModelArguments:
    return ModelArguments(lm_model_name_or_path=lm, vision_model_name_or_path="clip-vit-large-patch14-336", lang_lora_dim=0, lm_training="full")


@pytest.fixture(scope="module")
def full_lm():
    return {size: model_facts(_full_lm(f"llama-2-{size}")) for size in ("7b", "13b")}


def test_full_lm_trains_the_whole_lm(full_lm):
    for facts in full_lm.values():
        lm = sum(facts.counts[c]["total"] for c in ("LM input embeddings", "new token embeddings", "language model"))
        trainable = facts.total(trainable=True)
        assert trainable == lm + facts.counts["projector"]["total"]
        assert facts.lm_trained_layers == facts.layers
    assert 6.7e9 < full_lm["7b"].total(trainable=True) < 6.8e9 and 13.0e9 < full_lm["13b"].total(trainable=True) < 13.1e9


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_full_lm_stage_2_on_1_2_and_8_gpus(full_lm, size):
    """ZeRO's arithmetic for 16 bytes per trained parameter (bf16 weight and gradient, fp32 master and moments)."""
    facts = full_lm[size]
    psi = facts.total(trainable=True)
    table = {}
    for gpus in (1, 2, 8):
        for stage, offload in STAGE2_SETUPS:
            setup = MemorySetup(zero_stage=stage, offload=offload, num_gpus=gpus, micro_batch=16, seq_len=2048, gradient_checkpointing=True)
            est = estimate(facts, setup)
            table[gpus, stage, offload] = est
            shard = -(-psi // gpus)
            if offload == "none":
                assert est.optimizer_states == 12 * shard and est.cpu_total == 0
            else:
                assert est.optimizer_states == 0 and est.cpu_optimizer_states + est.cpu_gradients == 16 * shard
            if stage == 2:
                assert est.trainable_weights == 2 * psi  # every rank holds the whole bf16 model
    for stage, offload in STAGE2_SETUPS:
        peaks = [table[g, stage, offload].total for g in (1, 2, 8)]
        assert peaks[0] >= peaks[1] >= peaks[2], (stage, offload)
    for gpus in (2, 8):
        assert table[gpus, 3, "none"].model_states < table[gpus, 2, "none"].model_states
    # one 80 GB GPU cannot fine-tune a 7B LM without offload; eight can at ZeRO-3
    assert table[1, 2, "none"].total > 80 * GiB and table[1, 3, "none"].total > 80 * GiB
    assert table[8, 3, "none"].total < (80 if size == "7b" else 141) * GiB


def test_a_trained_layer_keeps_every_linear_input(full_lm):
    """Per token in bf16: 16h + 4h_kv + 8i + 4a bytes (41.5 h for LLaMA-2-7B shapes), as the package docstring derives."""
    from mmtrain.memory import lm_layer_activation_bytes

    f = full_lm["7b"]
    per_token = lm_layer_activation_bytes(f, 1000, 2, trained=True) / 1000
    assert per_token == pytest.approx(16 * f.hidden + 4 * f.kv_dim + 8 * f.intermediate + 4 * f.heads, rel=1e-6)
    assert per_token / f.hidden == pytest.approx(41.5, abs=0.1)
    assert lm_layer_activation_bytes(f, 1000, 2) < lm_layer_activation_bytes(f, 1000, 2, trained=True)


def test_last_layers_count_only_those_layers(full_lm):
    facts = model_facts(replace(_full_lm("llama-2-7b"), lm_training="last_layers", lm_trainable_layers=4, train_full_embeddings=False, train_lm_head=False))
    assert facts.lm_trained_layers == 4
    setup = MemorySetup(zero_stage=2, micro_batch=4)
    frozen = replace(_full_lm("llama-2-7b"), lm_training="frozen", train_full_embeddings=False, train_lm_head=False)
    assert estimate(frozen, setup).activations < estimate(facts, setup).activations < estimate(full_lm["7b"], setup).activations


def test_fit_warning_names_the_estimate_and_what_fits(full_lm):
    from mmtrain.memory import fit_warning

    setup = MemorySetup(zero_stage=2, num_gpus=1, micro_batch=4, seq_len=2048)
    warning = fit_warning(full_lm["7b"], setup, 80 * GiB)
    assert warning.startswith("predicted peak ") and "for zero2 on 1 GPU(s)" in warning and "6,7" in warning
    fits = warning.split("would fit: ")[1]
    assert "zero3+off-opt+par" in fits and "zero2 (" not in fits
    assert fit_warning(full_lm["7b"], replace(setup, zero_stage=3, num_gpus=8, gradient_checkpointing=True), 80 * GiB) is None


def test_cli_knows_the_lm_modes(capsys):
    from mmtrain.memory import main

    argv = ["--lm_model_name_or_path", "llama-2-7b", "--vision_model_name_or_path", "clip-vit-large-patch14-336", "--lm_training", "full",
            "--lang_lora_dim", "0", "--num_gpus", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    zero3 = next(e for e in out["estimates"] if e["name"] == "zero3")
    assert zero3["optimizer_states"] == 12 * -(-model_facts(_full_lm("llama-2-7b")).total(trainable=True) // 2)


# Float8 frozen weights: --fp8_base.


def test_fp8_base_counts_converted_weights_at_one_byte_plus_scales(ref7b):
    # llama-2-7b: 32 layers of q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008), all 16-aligned
    assert ref7b.fp8_base_weights == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert ref7b.fp8_base_scales == 32 * (4 * 4096 + 2 * 11008 + 4096)
    # clip-vit-large read at its second-to-last layer: 23 layers of q, k, v, out (1024 x 1024) and fc1, fc2 (1024 x 4096)
    assert ref7b.fp8_vision_weights == 23 * (4 * 1024 * 1024 + 2 * 1024 * 4096)
    base = MemorySetup(micro_batch=2)
    plain, fp8 = estimate(ref7b, base), estimate(ref7b, replace(base, fp8_base=True))
    assert plain.frozen_weights - fp8.frozen_weights == ref7b.fp8_base_weights - 4 * ref7b.fp8_base_scales
    assert fp8.cpu_weights - plain.cpu_weights == 2 * ref7b.fp8_base_weights  # the originals, kept for exports
    assert fp8.activations == plain.activations and fp8.setup.name == "zero0+fp8"
    both = estimate(ref7b, replace(base, fp8_base=True, fp8_vision=True))
    assert fp8.frozen_weights - both.frozen_weights == ref7b.fp8_vision_weights - 4 * ref7b.fp8_vision_scales


def test_fp8_base_is_refused_at_zero3_and_left_out_of_its_rungs():
    with pytest.raises(ConfigError, match="refused at ZeRO stage 3"):
        MemorySetup(zero_stage=3, fp8_base=True)
    rungs = all_setups(MemorySetup(fp8_base=True))
    assert all(s.fp8_base == (s.zero_stage < 3) for s in rungs)


def test_cli_takes_fp8_base(capsys):
    from mmtrain.memory import main

    assert main(["--lang_lora_dim", "4", "--seq_len", "256", "--gpu_memory", "24GiB", "--fp8_base"]) == 0
    out = capsys.readouterr().out
    assert "zero0+fp8" in out and "zero3+off-opt+par" in out and "zero3+off-opt+par+fp8" not in out


def test_cli_takes_a_token_budget_as_one_full_row(capsys):
    from mmtrain.memory import main

    assert main(["--lang_lora_dim", "4", "--max_tokens_per_batch", "512", "--micro_batch", "3", "--gpu_memory", "24GiB"]) == 0
    budget = capsys.readouterr().out
    assert "micro-batch 1 x 512 tokens" in budget
    assert main(["--lang_lora_dim", "4", "--micro_batch", "1", "--seq_len", "512", "--gpu_memory", "24GiB"]) == 0
    assert capsys.readouterr().out == budget  # the same estimate as one row of 512 tokens
    assert main(["--lang_lora_dim", "4", "--max_tokens_per_batch", "-1"]) == 2
    assert "--max_tokens_per_batch must be >= 0" in capsys.readouterr().err


def test_checkpoint_host_cost_is_one_tensor_or_one_partition_not_the_whole_state(full_lm):
    """7B full fine-tune: a save adds at most one fp32 partition per rank (shrinking with GPUs), never the 80 GB state."""
    facts = full_lm["7b"]
    psi = facts.total(trainable=True)
    largest = max(n for n, trainable, _ in facts.params if trainable)
    assert largest == 4096 * 32000 or largest > 4096 * 32000  # the embedding table or the head, new rows included
    costs = {}
    for gpus in (1, 8):
        for offload in ("none", "optimizer"):
            est = estimate(facts, MemorySetup(zero_stage=2, offload=offload, num_gpus=gpus))
            costs[gpus, offload] = est.checkpoint_host
            assert est.checkpoint_disk == (12 + 2 + 12) * psi  # portable state, bf16 weights, fp32 master and moments
            assert est.as_dict()["checkpoint_host"] == est.checkpoint_host
    assert costs[1, "none"] == 4 * psi and costs[8, "none"] == 4 * -(-psi // 8)
    assert costs[1, "optimizer"] == costs[8, "optimizer"] == 4 * largest < 1 * GiB
    assert all(cost < 12 * psi / 2 for cost in costs.values())


def test_cli_table_has_the_checkpoint_rows(capsys):
    from mmtrain.memory import main

    assert main(["--lang_lora_dim", "4", "--seq_len", "256"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint: host" in out and "checkpoint: disk" in out


def test_nf4_base_counts_its_weights_at_4_127_bits_and_one_dequantised_linear(ref7b):
    # the same Linears float8 converts (all of llama-2-7b's are 16-aligned), every frozen one
    assert ref7b.nf4_base_weights == ref7b.fp8_base_weights and ref7b.nf4_largest == 4096 * 11008
    base = MemorySetup(micro_batch=2)
    plain, nf4 = estimate(ref7b, base), estimate(ref7b, replace(base, nf4_base=True))
    packed = -(-ref7b.nf4_base_weights * 4127 // 8000)  # 4 bits, an 8-bit absmax per 64, a float32 per 64 x 256
    assert plain.frozen_weights - nf4.frozen_weights == pytest.approx(2 * ref7b.nf4_base_weights - packed - 2 * ref7b.nf4_largest, abs=2**20)
    assert nf4.cpu_weights == plain.cpu_weights  # no originals kept: exports dequantise
    assert nf4.setup.name == "zero0+nf4" and nf4.activations == plain.activations
    with pytest.raises(ConfigError, match="refused at ZeRO stage 3"):
        MemorySetup(zero_stage=3, nf4_base=True)
    with pytest.raises(ConfigError, match="not both"):
        MemorySetup(nf4_base=True, fp8_base=True)
    assert all(s.nf4_base == (s.zero_stage < 3) for s in all_setups(MemorySetup(nf4_base=True)))


@pytest.mark.parametrize("cap,base,offload", [(12, "nf4", "none"), (16, "nf4", "none"), (24, None, "none"), (48, None, "none")])
def test_small_gpu_recommendations_fit_and_are_the_fastest_that_do(ref7b, cap, base, offload):
    """What mmtrain.memory recommends for ref-7b on one GPU of 12-48 GiB (benchmarks/small_gpu.py measures these)."""
    from mmtrain.memory.options import best, command, model_flags, options

    rows = options(ref7b, MemorySetup(compiled=True), cap * GiB)
    choice = best(rows)
    usable = int(cap * GiB * 0.95) - GiB
    assert choice is not None and choice.fits and choice.estimate.total <= usable
    assert choice.base != "fp8"  # float8 only for --float8_gpu
    assert all(o.tokens_per_s <= choice.tokens_per_s for o in rows if o.fits and o.base != "fp8")
    assert base is None or choice.base == base
    assert choice.offload == offload
    # 7B in bfloat16 alone is 12.6 GiB: below 16 GiB only a 4-bit base (or parameter offload, far slower) fits
    assert any(o.fits and o.base == "bf16" and o.offload == "none" for o in rows) == (cap >= 24)
    run = command(choice, model_flags(ref_model_args("ref-7b")), 2048)
    assert run.startswith(f"accelerate launch --config_file accelerate_configs/{choice.config_file} mmtrain/train.py --lm_model_name_or_path llama-2-7b")
    assert f"--max_tokens_per_batch {choice.max_tokens_per_batch}" in run
    assert ("--quantize_base nf4" in run) == (choice.base == "nf4")
    assert ("--gradient_checkpointing true" in run) == choice.gradient_checkpointing


def test_a_float8_gpu_may_be_recommended_float8_and_13b_needs_nf4_on_24_gib(ref7b):
    from mmtrain.memory.options import best, options

    assert best(options(ref7b, MemorySetup(compiled=True), 24 * GiB), float8_gpu=True).base == "fp8"
    ref13b = model_facts(ref_model_args("ref-13b"))
    choice = best(options(ref13b, MemorySetup(compiled=True), 24 * GiB))
    assert choice.base == "nf4" and choice.fits


def test_cli_answers_the_small_gpu_question(capsys):
    from mmtrain.memory import main

    argv = ["--lm_model_name_or_path", "llama-2-7b", "--vision_model_name_or_path", "clip-vit-large-patch14-336", "--gpu_memory", "12GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens/s (H200, predicted)" in out and "nf4 zero0" in out and "bf16 zero0" in out and "fp8 zero0" in out
    assert "fastest option that fits (float8 rows left out" in out and "--quantize_base nf4" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "--quantize_base nf4" in data["recommended_option"]["command"]
    assert {o["base"] for o in data["options"]} == {"bf16", "fp8", "nf4", "nf4+vision"}
    assert main(["--workload", "ref-13b", "--gpu_memory", "24GiB", "--compiled", "true"]) == 0
    out = capsys.readouterr().out
    assert "--lm_model_name_or_path llama-2-13b --vision_model_name_or_path clip-vit-bigG-14 --vis_proj perceiver" in out


# Preference tuning (--objective dpo): pairs are two rows with their images once, and the
# reference keeps a starting copy of every trained tensor but fresh LoRA.


def test_dpo_pairs_are_two_rows_with_images_once_and_lora_needs_no_copy(ref7b):
    sft, dpo = estimate(ref7b, MemorySetup(micro_batch=2)), estimate(ref7b, MemorySetup(micro_batch=2, preference_pairs=True))
    rows = estimate(ref7b, MemorySetup(micro_batch=4))  # the same four rows as SFT samples, each with its own image
    assert dpo.logits == rows.logits and dpo.vision_transient == sft.vision_transient < rows.vision_transient
    assert sft.activations < dpo.activations < rows.activations
    lora = ref7b.counts["LM LoRA"]["trainable"]
    copies = 2 * (ref7b.total(trainable=True) - lora)  # projector and new rows, bf16
    assert dpo.frozen_weights - sft.frozen_weights == copies and copies < 2 * lora  # LoRA is switched off, not copied


def test_a_shared_prompt_holds_one_row_and_a_second_answer_per_pair(ref7b):
    """ref-7b pairs of 2048-token halves, a quarter of the text tokens answers: one row of 2048 + 368 tokens, not two."""
    halves = estimate(ref7b, MemorySetup(micro_batch=4, seq_len=2048, preference_pairs=True))
    shared = estimate(ref7b, replace(halves.setup, shared_prompt=True))
    answer = int(0.25 * (2048 - 576))
    assert shared.logits == halves.logits  # both answers' labels either way
    assert shared.activations < 0.65 * halves.activations
    one_row = estimate(ref7b, MemorySetup(micro_batch=4, seq_len=2048 + answer))
    assert shared.activations == pytest.approx(one_row.activations, rel=0.01)  # a 2,416-token row with its image


def test_dpo_with_the_whole_lm_trained_keeps_a_frozen_copy_of_it(full_lm):
    facts = full_lm["7b"]
    sft = estimate(facts, MemorySetup(zero_stage=2, num_gpus=8))
    dpo = estimate(facts, MemorySetup(zero_stage=2, num_gpus=8, preference_pairs=True))
    assert dpo.frozen_weights - sft.frozen_weights == 2 * facts.total(trainable=True)  # ~13.5 GB at 7B, whole on each GPU
    assert dpo.frozen_weights - sft.frozen_weights > 12 * GiB


def test_cli_counts_dpo_pairs(capsys):
    from mmtrain.memory import main

    assert main(["--lang_lora_dim", "4", "--seq_len", "256", "--micro_batch", "2", "--json"]) == 0
    sft = json.loads(capsys.readouterr().out)
    assert main(["--lang_lora_dim", "4", "--seq_len", "256", "--micro_batch", "2", "--objective", "dpo", "--json"]) == 0
    dpo = json.loads(capsys.readouterr().out)
    assert dpo["estimates"][0]["setup"]["preference_pairs"] and dpo["estimates"][0]["activations"] > sft["estimates"][0]["activations"]


def test_anyres_tiles_count_the_largest_grid_s_tokens_and_tiles(ref7b):
    """ref-7b with up to 4 tiles of 336 px: the costliest image fills the 4x1 grid (1344x336 px),
    576 + 96 rows x (24 + 1) = 2,976 positions (2x2's 672x672 takes 2,928); the tower runs on five inputs."""
    args = ref_model_args("ref-7b")
    args.anyres_max_tiles = 4
    tiled = model_facts(args)
    assert (tiled.image_tokens, tiled.tiles_per_image) == (2976, 5)
    assert (ref7b.image_tokens, ref7b.tiles_per_image) == (576, 1)
    setup = MemorySetup(micro_batch=1, seq_len=4096)
    plain, tiles = estimate(ref7b, setup), estimate(tiled, setup)
    assert tiles.vision_transient == pytest.approx(5 * plain.vision_transient, rel=1e-6)
    assert tiles.activations > plain.activations and tiles.logits < plain.logits  # more image positions, fewer text ones


def test_sequence_parallel_divides_the_lms_activations_not_the_images(ref7b):
    """A 32k-token row of 8 images on 2 GPUs: each keeps half the LM's activations and logits; vision and projector stay whole."""
    whole = estimate(ref7b, MemorySetup(zero_stage=3, num_gpus=2, seq_len=32768, images_per_sample=8, gradient_checkpointing=True))
    split = estimate(ref7b, replace(whole.setup, sequence_parallel=2))
    assert split.setup.name == "zero3+ckpt+sp2"
    assert split.model_states == whole.model_states  # ZeRO partitions over both GPUs either way
    assert split.vision_transient == whole.vision_transient
    mask = 32768**2  # the boolean mask a whole row builds; a split row takes none
    assert split.logits == pytest.approx(whole.logits / 2, abs=1)
    projector = 8 * 576 * (1024 + 2 * 4096) * 2  # ref-7b's MLP projector over the row's 8 images, on each GPU
    assert split.activations - projector == pytest.approx((whole.activations - projector - mask) / 2, rel=1e-3)
    assert split.total < 0.7 * whole.total
    with pytest.raises(ConfigError, match="sequence_parallel must be >= 1 and divide num_gpus"):
        MemorySetup(num_gpus=2, sequence_parallel=4)


def test_cli_takes_the_sequence_parallel_size(capsys):
    from mmtrain.memory import main

    assert main(["--workload", "ref-7b", "--num_gpus", "2", "--max_tokens_per_batch", "32768", "--sequence_parallel_size", "2", "--json"]) == 0
    assert main(["--workload", "ref-7b", "--num_gpus", "2", "--sequence_parallel_size", "3"]) == 2
    assert "--sequence_parallel_size must be >= 1 and divide --num_gpus (2), got 3" in capsys.readouterr().err


def test_precompute_ref_frees_the_reference_copies_before_the_first_step(full_lm):
    facts = full_lm["7b"]
    copies = 2 * facts.total(trainable=True)  # the frozen copy of the whole LM, bf16
    live = estimate(facts, MemorySetup(zero_stage=2, num_gpus=8, preference_pairs=True))
    table = estimate(facts, MemorySetup(zero_stage=2, num_gpus=8, preference_pairs=True, precompute_ref=True))
    assert live.frozen_weights - table.frozen_weights == copies
    assert table.reference_transient > copies and table.total < live.total  # made before any activation piles up
    assert live.total - table.total > 10 * GiB
    # At ZeRO-3 each rank keeps its share of the copies; offloaded parameters keep theirs on the host.
    zero3 = estimate(facts, MemorySetup(zero_stage=3, num_gpus=8, preference_pairs=True))
    sft3 = estimate(facts, MemorySetup(zero_stage=3, num_gpus=8))
    assert zero3.frozen_weights - sft3.frozen_weights == math.ceil(facts.total(trainable=True) / 8) * 2
    offloaded = estimate(facts, MemorySetup(zero_stage=3, num_gpus=8, offload="optimizer+params", preference_pairs=True))
    sft_offloaded = estimate(facts, MemorySetup(zero_stage=3, num_gpus=8, offload="optimizer+params"))
    assert offloaded.frozen_weights == sft_offloaded.frozen_weights
    assert offloaded.cpu_weights - sft_offloaded.cpu_weights == math.ceil(facts.total(trainable=True) / 8) * 2


def test_cli_precompute_ref_needs_dpo(capsys):
    from mmtrain.memory import main

    assert main(["--lang_lora_dim", "0", "--lm_training", "full", "--seq_len", "256", "--objective", "dpo", "--json"]) == 0
    live = json.loads(capsys.readouterr().out)["estimates"][0]
    assert main(["--lang_lora_dim", "0", "--lm_training", "full", "--seq_len", "256", "--objective", "dpo", "--precompute_ref", "true", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["estimates"][0]
    assert table["setup"]["precompute_ref"] and table["frozen_weights"] < live["frozen_weights"] and table["reference_transient"] > 0
    assert main(["--precompute_ref", "true"]) == 2
    assert "--precompute_ref applies to --objective dpo only" in capsys.readouterr().err
