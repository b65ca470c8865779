"""Preference pairs with their prompt computed once: one prompt, two answer branches, in one row.

The two halves of a preference pair (:mod:`mmtrain.data.preference`) are the same tokens
up to where the answers differ: the images, the system prompt, earlier turns, the
question. Under causal attention a token's hidden states depend only on the tokens before
it, so those shared tokens compute the same values in both halves. A pair is laid out as

    [ prompt (s tokens) | chosen branch | rejected branch ]

where ``s`` is one less than the halves' common prefix and each branch is its half from
token ``s`` on: both branches start with the last common token, at the same position, so
each branch's first position predicts that branch's first differing token and every
label stays the next token of its own row, as the loss expects. Positions (``position_ids``)
of each branch continue from the prompt's; the rejected branch attends to the prompt and
to itself, never to the chosen branch. The tokens computed per pair drop from
``2 (s + 1) + a_c + a_r`` to ``s + 2 + a_c + a_r`` (``a``: the answers); for the 2,048-token
halves with 256-token answers of the DPO bench, 4,096 -> 2,305. The pair's images are
in its prompt, so they are encoded and projected once with nothing to repeat.

A batch of such rows carries (:mod:`mmtrain.batch`): ``document_ids`` (the pair of each
token in its row, -1 on padding), ``branch_ids`` (0 prompt, 1 chosen, 2 rejected), and for
the variable-length kernels the query segments ``cu_seq_lens`` (each pair's prompt with
its chosen branch, then its rejected branch), the keys' stream ``kv_index`` (flat token
indices: the prompt and the chosen branch, then the prompt again and the rejected
branch) with its segments ``kv_cu_seq_lens``. FlashAttention-2 aligns a segment's causal
mask to its last key (:func:`mmtrain.model.varlen_attention.varlen_attention`), which is
exactly a branch seeing its prompt and its own earlier tokens. Elsewhere (a CPU, eager
or SDPA attention) the same structure is a dense mask (:func:`dense_mask`).

Written here because no library lays pairs out this way: TRL's DPO trainer runs the two
halves as separate rows.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtrain.compat import transformers as transformers_compat
from mmtrain.model import varlen_attention

PROMPT, CHOSEN, REJECTED = 0, 1, 2


def dense_mask(document_ids: torch.Tensor, branch_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, 1, L, L]`` mask of rows of shared-prompt pairs: boolean (True: attend), or additive in ``dtype``
    (0: attend, the dtype's lowest: not; what eager attention adds to its scores).

    Token q sees token k of its own pair at or before it that is in the prompt or in q's
    own branch. A padding token sees itself only (its output is never used).
    """
    length = document_ids.shape[1]
    order = torch.arange(length, device=document_ids.device)
    causal = order[None, :, None] >= order[None, None, :]
    same_pair = document_ids[:, :, None] == document_ids[:, None, :]
    same_branch = (branch_ids[:, None, :] == PROMPT) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    pad = document_ids < 0
    allowed = causal & same_pair & same_branch & ~pad[:, :, None]
    allowed = (allowed | (torch.eye(length, dtype=torch.bool, device=document_ids.device)[None] & pad[:, :, None]))[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device).masked_fill(~allowed, torch.finfo(dtype).min)


def decoder_inputs(
    language_model: nn.Module, document_ids: torch.Tensor, branch_ids: torch.Tensor, kv_index: torch.Tensor,
    kv_cu_seq_lens: torch.Tensor, max_kv_segment_len: int, dtype: torch.dtype,
) -> tuple[torch.Tensor | None, dict]:
    """``(attention_mask, decoder kwargs)`` for a batch of shared-prompt rows and the LM's kernel.

    A variable-length kernel takes the keys' stream (and no mask); any other attention the
    dense mask (flex attention then applies it as a score modification: correct, and as slow
    as a dense mask). Sliding windows and capped logits are kept off such batches when they are
    planned (:func:`can_share`).
    """
    if varlen_attention.uses_varlen(language_model):
        kv = {
            varlen_attention.KV_INDEX_KWARG: kv_index,
            varlen_attention.KV_OFFSETS_KWARG: kv_cu_seq_lens,
            varlen_attention.KV_LONGEST_KWARG: int(max_kv_segment_len),
        }
        return None, kv
    # SDPA takes a boolean mask; eager attention and flex attention (where FlashAttention-2
    # cannot run: 32-bit activations, GPUs before Ampere) add the mask to their scores.
    boolean = transformers_compat.attn_implementation(language_model.config) == "sdpa"
    return dense_mask(document_ids, branch_ids, None if boolean else dtype), {}


def can_share(lm_config, mmca: bool) -> str | None:
    """Why an LM cannot run shared-prompt rows (None: it can): what neither the dense mask nor the varlen kernel applies."""
    if mmca:
        return "MMCA (--enable_mmca_attention) builds its own mask over whole rows"
    return varlen_attention.unsupported(lm_config)
