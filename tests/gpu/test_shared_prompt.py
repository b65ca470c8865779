"""Shared-prompt pairs through FlashAttention-2's variable-length kernel on a GPU: each branch's keys gathered
from its prompt and itself, its causal mask aligned to its last key, as the reference kernel computes it."""

from __future__ import annotations

import torch

from mmtrain.data.preference import PairCollator, SharedPromptCollator
from mmtrain.model.attention import use_packed_attention
from tests.model.test_shared_prompt import answers, build_pairs


def _on(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_flash_varlen_shared_prompt_rows_match_the_reference_kernel_and_the_halves(tmp_path, tiny_args):
    built, items = build_pairs(tmp_path, tiny_args)
    model = built.model.to("cuda", torch.bfloat16)
    pad = built.tokenizer.pad_token_id
    halves, halves_tokens, _ = answers(model, _on(PairCollator(pad)(items), "cuda"))
    shared = _on(SharedPromptCollator(pad, 8, capacity=4096)(items), "cuda")
    use_packed_attention(model.language_model, "reference")
    reference, tokens, reference_grads = answers(model, shared)
    use_packed_attention(model.language_model, "flash_varlen")
    flash, flash_tokens, flash_grads = answers(model, shared)
    assert torch.equal(tokens, halves_tokens) and torch.equal(flash_tokens, tokens)
    torch.testing.assert_close(flash, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(flash, halves, rtol=3e-2, atol=5e-2)
    for name, grad in flash_grads.items():  # bfloat16 rounding of two kernels: whole-tensor relative error
        want = reference_grads[name].float()
        assert (grad.float() - want).norm() <= 3e-2 * want.norm() + 1e-6, name
