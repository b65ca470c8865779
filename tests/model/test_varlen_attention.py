"""Packed rows through variable-length attention: the offsets, and the same numbers as the masked path."""

from __future__ import annotations

import pytest
import torch

from mmtrain.data import Collator
from mmtrain.data.packing import PackingCollator
from mmtrain.model.attention import check_packed_attention
from mmtrain.model import build_model
from mmtrain.model import varlen_attention
from mmtrain.model.config import SpeedOptions
from tests.adapters import randomise_lora
from tests.data.test_packing import _items

SPECS = [(1, 9), (0, 12), (2, 4), (1, 30), (0, 3)]


def _segments(batch) -> list[int]:
    # Runs of position_ids restarting at 0, rows read end to end: what cu_seq_lens must encode.
    lengths = []
    for row in batch["position_ids"].tolist():
        for position in row:
            if position == 0:
                lengths.append(0)
            lengths[-1] += 1
    return lengths


def test_packing_collator_gives_every_segment_its_offset(tiny_args):
    built = build_model(tiny_args())
    items = _items(built, SPECS)
    capacity = max(len(i["input_ids"]) for i in items) + 20
    batch = PackingCollator(built.tokenizer.pad_token_id, capacity, pad_to_multiple_of=16)(items)
    rows, length = batch["input_ids"].shape
    assert rows > 1  # several rows, and padding tails (a multiple of 16)
    offsets = batch["cu_seq_lens"]
    assert offsets.dtype == torch.int32 and int(offsets[0]) == 0 and int(offsets[-1]) == rows * length
    assert torch.diff(offsets).tolist() == _segments(batch)
    assert batch["max_segment_len"] == max(_segments(batch))
    assert sum(1 for n in _segments(batch)) >= len(items)


EQUAL_SPECS = [(1, 9)] * 4  # four samples of one length: packed rows of equal segments


@pytest.mark.parametrize(
    "lm,specs,per_row",
    [
        ("tiny-llama", SPECS, None),  # both LMs with grouped key/value heads (4 / 2)
        ("tiny-qwen2", SPECS, None),
        ("tiny-llama", EQUAL_SPECS, 4),  # one row of four equal samples: the dense equal-segment path
        ("tiny-qwen2", EQUAL_SPECS, 2),  # two rows of two
    ],
)
def test_varlen_attention_equals_the_masked_packed_path(tiny_args, model_folders, lm, specs, per_row):
    args = tiny_args(lm_model_name_or_path=model_folders[lm], lang_lora_dim=4, lang_lora_alpha=4)
    masked = build_model(args).model
    varlen = build_model(args, speed=SpeedOptions(packed_attention="reference")).model
    language = varlen.language_model
    assert varlen_attention.uses_varlen(language) and not varlen_attention.uses_varlen(masked.language_model)
    check_packed_attention(language.config)  # no mask by design: accepted
    randomise_lora(masked)
    varlen.load_state_dict(masked.state_dict())
    built = build_model(args)
    items = _items(built, specs)
    if per_row is None:  # mixed lengths and padding tails
        packed = PackingCollator(built.tokenizer.pad_token_id, max(len(i["input_ids"]) for i in items) + 20, pad_to_multiple_of=16)(items)
    else:  # rows filled exactly by equal samples
        packed = PackingCollator(built.tokenizer.pad_token_id, per_row * len(items[0]["input_ids"]))(items)
        assert packed["input_ids"].shape[0] == len(items) // per_row
    kwargs = varlen_attention.varlen_lm_kwargs(language, packed["cu_seq_lens"], packed["max_segment_len"], packed["input_ids"].numel())
    assert (varlen_attention.SEGMENT_LEN_KWARG in kwargs) == (per_row is not None)

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(**packed)
        (out.loss * out.num_label_tokens).backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_masked, grads_masked = run(masked)
    loss_varlen, grads_varlen = run(varlen)
    torch.testing.assert_close(loss_varlen, loss_masked, rtol=1e-5, atol=1e-6)
    assert grads_masked.keys() == grads_varlen.keys() and any(".lora_" in n for n in grads_masked)
    for name in grads_masked:
        torch.testing.assert_close(grads_varlen[name], grads_masked[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("rows,heads,kv_heads", [(1, 4, 4), (2, 4, 2)])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])  # contiguous as [B, H, L, D], or a transposed [B, L, H, D]
def test_equal_segments_equal_the_reference(rows, heads, kv_heads, layout):
    gen = torch.Generator().manual_seed(0)
    segment, per_row, dim = 6, 3, 8
    length = segment * per_row

    def make(h):
        if layout == "bhld":
            return torch.randn(rows, h, length, dim, generator=gen, dtype=torch.float64)
        return torch.randn(rows, length, h, dim, generator=gen, dtype=torch.float64).transpose(1, 2)

    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    got = varlen_attention.equal_segments_sdpa(q, k, v, segment, scale=0.3)
    stream = [t.transpose(1, 2).reshape(rows * length, t.shape[1], dim) for t in (q, k, v)]  # segments_sdpa takes grouped heads
    offsets = torch.arange(0, rows * length + 1, segment)
    want = varlen_attention.segments_sdpa(*stream, offsets, scale=0.3)
    assert got.shape == (rows, length, heads, dim)
    torch.testing.assert_close(got.reshape(rows * length, heads, dim), want)


def test_only_equal_segments_take_the_dense_path(tiny_args):
    language = build_model(tiny_args(), speed=SpeedOptions(packed_attention="reference")).model.language_model
    kwargs = varlen_attention.varlen_lm_kwargs
    equal = torch.tensor([0, 5, 10, 15], dtype=torch.int32)
    assert kwargs(language, equal, 5, 15) == {varlen_attention.SEGMENT_LEN_KWARG: 5}
    mixed = torch.tensor([0, 5, 8, 15], dtype=torch.int32)  # 5 + 3 + 7: longest 7, three segments, 15 tokens
    got = kwargs(language, mixed, 7, 15)
    assert got[varlen_attention.OFFSETS_KWARG] is mixed and got[varlen_attention.LONGEST_KWARG] == 7
    assert varlen_attention.SEGMENT_LEN_KWARG not in got
    assert kwargs(language, None, None, 15) == {}


def test_varlen_attention_keeps_samples_apart(tiny_args):
    """Changing one sample changes no other sample's logits."""
    built = build_model(tiny_args(), speed=SpeedOptions(packed_attention="reference"))
    items = _items(built, [(0, 10), (0, 10)])
    collate = PackingCollator(built.tokenizer.pad_token_id, 64)
    first = collate(items)
    items[0]["input_ids"] = items[0]["input_ids"].flip(0)
    second = collate(items)
    assert first["input_ids"].shape[0] == 1
    with torch.no_grad():
        a = built.model(**first, return_logits=True).logits
        b = built.model(**second, return_logits=True).logits
    n = len(items[0]["input_ids"])
    assert not torch.allclose(a[:, :n], b[:, :n])
    torch.testing.assert_close(a[:, n:], b[:, n:])


def test_unpacked_batches_go_through_sdpa_with_its_mask(tiny_args):
    """Padded evaluation (with and without the padding mask) and cached generation give what the default model gives."""
    from mmtrain.model.generation import SamplingOptions, generate

    args = tiny_args(lang_lora_dim=4, lang_lora_alpha=4)
    plain = build_model(args)
    varlen = build_model(args, speed=SpeedOptions(packed_attention="reference"))
    randomise_lora(plain.model)
    varlen.model.load_state_dict(plain.model.state_dict())
    items = _items(plain, [(0, 4), (1, 6), (2, 3)])
    padded = Collator(plain.tokenizer.pad_token_id)(items)
    with torch.no_grad():
        for return_logits in (False, True):  # without and with the padding mask (the model keeps it for logits)
            want, got = (built.model(**padded, return_logits=return_logits) for built in (plain, varlen))
            torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
            if return_logits:
                real = padded["attention_mask"].bool()
                torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-4, atol=1e-5)
    prompts = [item["input_ids"][:-2] for item in items]  # different lengths: left-padded
    images = [item["pixel_values"] for item in items]
    options = SamplingOptions(max_new_tokens=6)
    want, got = (generate(built.model, prompts, images, eos_token_id=1, pad_token_id=plain.tokenizer.pad_token_id, options=options) for built in (plain, varlen))
    assert got == want and any(len(tokens) for tokens in want)


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="flash_varlen"):
        varlen_attention.implementation("tiled")


@pytest.mark.parametrize("kernel", varlen_attention.KERNELS)
def test_registered_names_are_not_taken_for_flash_attention(kernel):
    # transformers loads a FlashAttention build or a Hub kernel for any implementation whose
    # name it reads as flash attention; a GPU run of "mmtrain_varlen_flash_varlen" failed so.
    from transformers.utils.generic import is_flash_attention_requested

    assert not is_flash_attention_requested(requested_attention_implementation=varlen_attention.implementation(kernel))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: cuDNN's attention kernel is what this checks")
def test_equal_segments_on_a_gpu_run_cudnn_compiled_and_match_fp32():
    """Eager, and compiled with dynamic shapes as the trainer's decoder layers are (two segment
    lengths through one compiled function): bf16 against an fp32 reference, forward and
    gradients, and the kernels that ran are cuDNN's."""
    from torch.profiler import ProfilerActivity, profile

    heads, dim = 8, 128
    compiled = torch.compile(varlen_attention.equal_segments_sdpa, dynamic=True)
    for function, segment, count in ((varlen_attention.equal_segments_sdpa, 256, 3), (compiled, 512, 4), (compiled, 384, 6)):
        gen = torch.Generator(device="cuda").manual_seed(segment)
        q, k, v = (torch.randn(1, segment * count, heads, dim, device="cuda", generator=gen).transpose(1, 2) for _ in range(3))
        grad = torch.randn(1, segment * count, heads, dim, device="cuda", generator=gen)
        fp32 = [t.clone().requires_grad_() for t in (q, k, v)]
        bf16 = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        want = varlen_attention.equal_segments_sdpa(*fp32, segment)
        want.backward(grad)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = function(*bf16, segment)
            got.backward(grad.to(torch.bfloat16))
            torch.cuda.synchronize()
        kernels = {e.name for e in prof.events() if e.device_type.name == "CUDA"}
        assert any("cudnn" in name.lower() for name in kernels), sorted(kernels)
        for a, b, what in [(got, want, "out"), *((x.grad, y.grad, f"d{n}") for x, y, n in zip(bf16, fp32, "qkv"))]:
            error = ((a.float() - b).norm() / b.norm()).item()
            assert error < 1e-2, f"segment {segment}: {what} relative error {error:.2e}"


def test_models_with_windows_or_capped_logits_are_named():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    assert varlen_attention.unsupported(LlamaConfig()) is None
    assert varlen_attention.unsupported(Qwen2Config()) is None  # use_sliding_window is off by default
    windowed = Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=0, num_hidden_layers=2)
    assert "sliding_attention" in varlen_attention.unsupported(windowed)
    assert "sliding window of 4096" in varlen_attention.unsupported(MistralConfig())
    assert "sliding_attention" in varlen_attention.unsupported(Gemma2Config())
    assert "attn_logit_softcapping" in varlen_attention.unsupported(LlamaConfig(attn_logit_softcapping=30.0))


def test_a_sliding_window_lm_keeps_flex_attention_for_packed_rows(tiny_args, model_folders, tmp_path, caplog):
    import json
    import logging
    import shutil

    from mmtrain.compat import transformers as transformers_compat

    folder = tmp_path / "qwen2-window"
    shutil.copytree(model_folders["tiny-qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    config.pop("layer_types", None)  # rebuilt from the window settings on load
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        built = build_model(tiny_args(lm_model_name_or_path=str(folder)), speed=SpeedOptions(packed_attention="reference"))
    language = built.model.language_model
    assert transformers_compat.attn_implementation(language.config) == "flex_attention" and not varlen_attention.uses_varlen(language)
    assert "flex attention instead of reference" in caplog.text and "sliding_attention" in caplog.text


def test_a_layer_window_reaching_the_kernel_is_refused():
    attention = varlen_attention._attention_function("reference")
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="sliding_window=2"):
        attention(None, q, q, q, None, sliding_window=2, **{varlen_attention.SEGMENT_LEN_KWARG: 2})
