"""Which attention implementation a model is built with: the one asked for, or eager where its class cannot run it.

``--attn_implementation`` (sdpa by default) is a request. Some transformers classes
refuse SDPA outright: Gemma 2 caps its attention logits, which SDPA cannot do, and
transformers raises "does not support ... scaled_dot_product_attention yet" when SDPA
is asked for by name. Such a model is built with eager attention instead, and the log
says so. Eager computes the same function on every device; flex attention could cap
the logits too, but on a CPU it needs a compiler toolchain, and on a GPU the packed
rows of a token budget switch such LMs to flex attention anyway
(:func:`mmtrain.model.builder.apply_speed_options`).

The decision is made here, from the model class alone, before any weights load; the
saved config keeps the request, so a reloaded export decides the same way.

Packed rows (a token budget's micro-batches, many samples in one row) take their own LM
kernel, also decided here (:func:`packed_kernel`, :func:`use_packed_attention`): from
``--packed_attention`` (auto by default), the device, the compute dtype and the LM's
config. SDPA would take such a row under a materialised ``[1, 1, N, N]`` mask and compute
every block of the square. FlashAttention-2's variable-length kernel takes the samples'
offsets instead and computes each on its own, and rows of equal samples go through
cuDNN's dense kernel (:mod:`mmtrain.model.varlen_attention`). Where FlashAttention-2
cannot run (a GPU older than Ampere, 32-bit activations, LMs with sliding windows or
capped logits), flex attention's document mask skips the blocks between samples. On a
CPU flex attention needs a compiler toolchain and runs slower than SDPA, so CPU runs keep
SDPA's mask, which gives the same numbers.
"""

from __future__ import annotations

import logging

import torch
import transformers
from torch import nn

from mmtrain.compat import transformers as transformers_compat
from mmtrain.model import varlen_attention

logger = logging.getLogger("mmtrain")

FALLBACK = "eager"
# --packed_attention: auto decides from the device (packed_kernel); sdpa keeps the materialised mask.
PACKED_CHOICES = ("auto", "flex_attention", "sdpa", *varlen_attention.VARLEN_KERNELS)


def attention_for(model_class: type, requested: str) -> tuple[str, str | None]:
    """``(implementation, why)``: ``requested`` if ``model_class`` can run it (``why`` is None), else eager and the reason."""
    if transformers_compat.supports_attention(model_class, requested):
        return requested, None
    return FALLBACK, f"{model_class.__name__} cannot run {requested} attention in transformers {transformers.__version__}"


def choose_attention(model_class: type, requested: str, flag: str = "--attn_implementation") -> str:
    """:func:`attention_for`'s choice, logged when it is not the one requested."""
    chosen, why = attention_for(model_class, requested)
    if why:
        logger.info(f"attention: {why}; {chosen} instead ({flag} {requested})")
    return chosen


def packed_kernel(choice: str, device: torch.device | str, dtype: torch.dtype, packed_rows: bool) -> str | None:
    """The LM kernel a run's packed rows take (None: SDPA with its mask, as on a CPU).

    ``choice`` is ``--packed_attention``; ``packed_rows`` whether the run's micro-batches
    are token-budget rows. ``auto``: FlashAttention-2's varlen kernel where it can run on
    ``device`` with ``dtype`` activations, else flex attention. The LM's own limits are
    checked when the kernel is switched on (:func:`use_packed_attention`).
    """
    if choice not in PACKED_CHOICES:
        raise ValueError(f"packed_attention {choice!r}: valid are {', '.join(PACKED_CHOICES)}")
    if not packed_rows or torch.device(device).type != "cuda":
        return None
    if choice == "auto":
        problem = varlen_attention.flash_attention_problem(device, dtype)
        return "flex_attention" if problem else "flash_varlen"
    return None if choice == "sdpa" else choice


def use_packed_attention(language_model: nn.Module, kernel: str) -> str:
    """Switch ``language_model``'s attention to ``kernel`` for packed rows; returns the kernel it takes (logged).

    A varlen kernel that cannot compute this LM's attention
    (:func:`mmtrain.model.varlen_attention.unsupported`) gives way to flex attention.
    """
    if kernel in varlen_attention.KERNELS and (why := varlen_attention.unsupported(language_model.config)):
        logger.info(f"packed rows: flex attention instead of {kernel}, which cannot compute this LM's attention: {why}")
        kernel = "flex_attention"
    if kernel in varlen_attention.KERNELS:
        # The samples' offsets instead of a mask (mmtrain/model/varlen_attention.py).
        language_model.set_attn_implementation(varlen_attention.register(kernel))
        logger.info(f"packed rows: LM attention through {kernel} (each sample its own sequence, no mask)")
    else:
        # Packed rows' samples are told apart by position_ids restarts; with flex attention
        # transformers turns them into a BlockMask, so blocks between two samples are skipped
        # instead of computed under a materialised [rows, 1, N, N] mask (SDPA).
        language_model.set_attn_implementation(kernel)
        logger.info(f"packed rows: LM attention through {kernel} (a document mask that skips the blocks across samples)")
    return kernel
