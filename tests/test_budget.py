"""The parameter budget: meta-device counts equal the real model's, and the 7B figures equal a hand count."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmtrain.args import ModelArguments
from mmtrain.budget import model_budget
from mmtrain.model import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("proj", ["baseline", "mlp", "vit", "perceiver"])
def test_meta_counts_equal_the_real_model(tiny_args, proj):
    args = tiny_args(vis_proj=proj, lang_lora_dim=4, vis_lora_dim=2, train_full_embeddings=False)
    real = {c.name: (c.total, c.trainable) for c in count_parameters(build_model(args).model)}
    meta = {r.name: (r.total, r.trainable) for r in model_budget(args) if r.name != "total"}
    assert meta == real
    # and the real model's numbers are the real tensors' sizes
    model = build_model(args).model

    assert sum(p.numel() for _, p in model.named_parameters()) == sum(t for t, _ in real.values())
    assert sum(p.numel() for _, p in model.named_parameters() if p.requires_grad) == sum(t for _, t in real.values())


def _llama_layer(h, i):
    return 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two RMSNorms


def _clip_layer(h, i):
    return 4 * (h * h + h) + 2 * h * i + i + h + 2 * 2 * h  # attention with biases, MLP, two LayerNorms


def test_7b_budget_matches_a_hand_count():
    args = ModelArguments(
        lm_model_name_or_path="llama-2-7b", vision_model_name_or_path="clip-vit-bigG-14", vis_proj="perceiver", lang_lora_dim=16
    )
    rows = {r.name: r for r in model_budget(args)}
    h, i, layers, vocab = 4096, 11008, 32, 32000
    assert rows["LM input embeddings"].total == vocab * h
    assert rows["language model"].total == layers * _llama_layer(h, i) + h + vocab * h  # layers, final norm, head
    assert rows["LM input embeddings"].total + rows["language model"].total == 6_738_415_616  # LLaMA-2-7B
    per_layer_lora = 16 * (4 * (h + h) + 2 * (h + i) + (i + h))
    assert rows["LM LoRA"].total == rows["LM LoRA"].trainable == layers * per_layer_lora == 39_976_960
    assert rows["new token embeddings"].trainable == 3 * h
    vh, vi, patches = 1664, 8192, 256
    embeddings = 3 * 14 * 14 * vh + vh + (patches + 1) * vh  # patch conv (no bias), CLS, positions
    kept_layers = 47  # the layer after the one read (-2) is not built
    # + the pre- and post-LayerNorm (the post one is built, though features are read before it)
    assert rows["vision encoder"].total == embeddings + 2 * 2 * vh + kept_layers * _clip_layer(vh, vi)
    queries = 64
    perceiver = vh * h + queries * h + 3 * 2 * h + (4 * h * h + 4 * h)  # kv proj, queries, 3 LayerNorms, attention
    assert rows["projector"].total == rows["projector"].trainable == perceiver
    assert rows["total"].trainable == rows["projector"].total + rows["LM LoRA"].total + 3 * h


# Runs a module as ``python -m`` would, then reports its own peak RSS on its last stderr
# line. The peak is VmHWM, the high-water mark of this process's memory since its exec.
# Not ru_maxrss: Linux carries that across fork and exec, so a child started from a
# large pytest process reports pytest's size (and RUSAGE_CHILDREN, the largest child of
# the whole session).
_PEAK_RSS_WRAPPER = """
import runpy, sys
module = sys.argv.pop(1)
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\npeak_rss_kib={peak}\\n")
"""


def _run_measured(module: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m module args`` in a subprocess; returns it and its peak RSS in GiB."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, module, *args], capture_output=True, text=True, env=env, timeout=120)
    found = re.search(r"peak_rss_kib=(\d+)\s*$", proc.stderr)
    assert found, f"no peak RSS reported:\n{proc.stderr[-2000:]}"
    return proc, int(found[1]) / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_budget_cli_is_quick_and_small():
    args = (
        "--lm_model_name_or_path", "llama-2-7b", "--vision_model_name_or_path", "clip-vit-bigG-14", "--vis_proj", "perceiver",
        "--lang_lora_dim", "16", "--json",
    )
    proc, peak_rss_gib = _run_measured("mmtrain.budget", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(proc.stdout)["components"]}
    assert rows["total"]["trainable"] == 114_216_960
    assert rows["total"]["optimizer_bytes"] == 12 * 114_216_960
    # a 7B model's weights alone are 13 GiB in bf16: a meta-device build reads and holds none
    assert peak_rss_gib < 2.0, f"budget used {peak_rss_gib:.2f} GiB"
    # the figure is this command's: an interpreter with torch loaded is at least ~100 MiB
    assert peak_rss_gib > 0.05, f"implausible peak RSS {peak_rss_gib:.3f} GiB"


def test_fp8_base_counts_the_converted_layers_at_one_byte(tiny_args):
    """The meta budget with --fp8_base equals the real converted model's counts, and its bytes are a hand count."""
    from mmtrain.model.config import SpeedOptions
    from mmtrain.model.counting import budget_from_counts

    args = tiny_args(lang_lora_dim=4)
    plain = {r.name: r for r in model_budget(args)}
    fp8 = {r.name: r for r in model_budget(args, fp8_base=True)}
    real = budget_from_counts(count_parameters(build_model(args, speed=SpeedOptions(fp8_base=True)).model))
    assert {r.name: r for r in real} == fp8
    lm = build_model(args).model.language_model
    cfg = lm.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    scales = 2 * h + 2 * kv + 2 * i + h
    saved = cfg.num_hidden_layers * (per_layer - 4 * scales)  # one byte less per weight, four more per scale
    assert plain["language model"].weight_bytes - fp8["language model"].weight_bytes == saved
    assert fp8["LM LoRA"] == plain["LM LoRA"] and fp8["vision encoder"] == plain["vision encoder"]
    assert fp8["total"].total == plain["total"].total  # the same parameters, held in fewer bytes


def test_nf4_counts_the_layers_it_would_quantise_at_4_127_bits(tiny_args):
    """The meta budget with NF4 (which the meta device cannot quantise) equals the real quantised model's counts."""
    pytest.importorskip("bitsandbytes")
    import math

    from mmtrain.model.config import SpeedOptions
    from mmtrain.model.counting import budget_from_counts

    args = tiny_args(lang_lora_dim=4)
    plain = {r.name: r for r in model_budget(args)}
    nf4 = {r.name: r for r in model_budget(args, nf4_base=True, nf4_vision=True)}
    real = budget_from_counts(count_parameters(build_model(args, speed=SpeedOptions(nf4_base=True, nf4_vision=True)).model))
    assert {r.name: r for r in real} == nf4
    cfg = build_model(args).model.language_model.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    weights = cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert plain["language model"].weight_bytes - nf4["language model"].weight_bytes == 2 * weights - math.ceil(weights * (4 + 8 / 64 + 32 / (64 * 256)) / 8)  # codes, absmaxes, their scales
    assert nf4["vision encoder"].weight_bytes < plain["vision encoder"].weight_bytes and nf4["total"].total == plain["total"].total
