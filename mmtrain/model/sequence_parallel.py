"""Sequence parallelism's model side: which LMs can be split, and DeepSpeed's Ulysses attention switched on.

Under sequence parallelism each process of a group holds ``1 / size`` of a row's positions
through the whole LM; only attention needs every position. DeepSpeed's Ulysses attention
(``UlyssesSPAttentionHF``, ALST) wraps the LM's attention function: an all-to-all turns
``[positions / size, all heads]`` into ``[all positions, heads / size]``, the wrapped
function computes attention for those heads over the whole row, and a second all-to-all
turns it back. Everything else (projections, MLP, norms, the loss) runs on the process's
own positions only, so activation memory is divided by ``size``.

What the wrapped function is given: the gathered ``position_ids`` of the whole row and no
mask (DeepSpeed drops 4D masks). Packed rows' samples are therefore kept apart by a
variable-length kernel reading the batch's segment offsets
(:mod:`mmtrain.model.varlen_attention`: FlashAttention-2's on a GPU that runs it, else
``reference``, SDPA per segment); rows of one sample take plain causal attention. Hence
what cannot be split (:func:`split_problem`):

* a head count (or key/value head count) that the group size does not divide (DeepSpeed
  also accepts fewer key/value heads than processes when the size is a multiple of them:
  it replicates them);
* sliding windows and capped attention logits: the varlen kernels compute neither, and
  under flex attention DeepSpeed rebuilds the block mask as plain causal;
* MMCA, whose attention is computed under a materialised mask of the whole row (causal,
  packed samples, image columns), which Ulysses drops.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.compat import transformers as transformers_compat
from mmtrain.model import varlen_attention

logger = logging.getLogger("mmtrain")


def head_counts(lm_config) -> tuple[int, int]:
    """``(attention heads, key/value heads)`` of a text config."""
    text = lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config
    heads = text.num_attention_heads
    return heads, getattr(text, "num_key_value_heads", None) or heads


def split_problem(lm_config, size: int, *, mmca: bool) -> str | None:
    """Why an LM of ``lm_config`` cannot be split over ``size`` processes (None: it can); from its config alone."""
    if size <= 1:
        return None
    if mmca:
        return (
            "MMCA computes attention under a materialised mask of the whole row (causal, packed samples, image "
            "columns), and DeepSpeed's Ulysses attention passes no mask to the function it wraps"
        )
    heads, kv_heads = head_counts(lm_config)
    if heads % size:
        return f"the LM has {heads} attention heads, which {size} processes cannot share equally"
    if kv_heads % size and size % kv_heads:
        return f"the LM has {kv_heads} key/value heads: {size} must divide them or be a multiple of them"
    if why := varlen_attention.unsupported(lm_config):
        return f"its attention cannot be computed per segment without a mask: {why}"
    return None


def split_kernel(device: torch.device | str, dtype: torch.dtype) -> str:
    """The varlen kernel the wrapped attention runs: FlashAttention-2's where it can, else the exact per-segment SDPA."""
    return "reference" if varlen_attention.flash_attention_problem(device, dtype) else "flash_varlen"


def enable_sequence_parallel(language_model: nn.Module, size: int, micro_batch: int) -> tuple[object, int]:
    """Wrap ``language_model``'s attention (a varlen kernel, set by the builder) in Ulysses; returns ``(group, rank)``.

    Every process of the run calls it at the same point, after the process group exists.
    """
    implementation = transformers_compat.attn_implementation(language_model.config)
    if not varlen_attention.is_varlen_attention(implementation):
        raise ValueError(f"sequence parallelism wraps a varlen attention kernel; the LM runs {implementation!r}")
    group, rank = deepspeed_compat.register_ulysses(language_model, implementation, size, micro_batch)
    logger.info(f"sequence parallelism: {size} processes per row, LM attention {implementation} through DeepSpeed's Ulysses all-to-all")
    return group, rank
