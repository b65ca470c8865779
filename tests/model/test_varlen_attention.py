"""Packed rows through variable-length attention: the offsets, and the same numbers as the masked path."""

from __future__ import annotations

import pytest
import torch

from mmtrain.data import Collator
from mmtrain.data.packing import PackingCollator, check_packed_attention
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


@pytest.mark.parametrize("lm", ["tiny-llama", "tiny-qwen2"])  # both with grouped key/value heads (4 / 2)
def test_varlen_attention_equals_the_masked_packed_path(tiny_args, model_folders, lm):
    args = tiny_args(lm_model_name_or_path=model_folders[lm], lang_lora_dim=4, lang_lora_alpha=4)
    masked = build_model(args).model
    varlen = build_model(args, speed=SpeedOptions(packed_attention="reference")).model
    language = varlen.language_model
    assert varlen_attention.uses_varlen(language) and not varlen_attention.uses_varlen(masked.language_model)
    check_packed_attention(language.config)  # no mask by design: accepted
    randomise_lora(masked)
    varlen.load_state_dict(masked.state_dict())
    built = build_model(args)
    items = _items(built, SPECS)
    packed = PackingCollator(built.tokenizer.pad_token_id, max(len(i["input_ids"]) for i in items) + 20, pad_to_multiple_of=16)(items)

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
