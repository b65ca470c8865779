"""Which attention kernel the LM runs: chosen here, from the config, the device and the kind of batch.

The steps, in the order a run takes them:

* building: :func:`attention_for` / :func:`choose_attention` (the requested implementation,
  or eager where the class cannot run it);
* packed rows: :func:`packed_kernel` (which kernel, from ``--packed_attention``, device and
  dtype), :func:`check_packed_attention` (transformers keeps packed samples apart for that
  kernel) and :func:`use_packed_attention` (switches the LM, logged once);
* each forward: :func:`decoder_kwargs` (what the chosen kernel needs from the batch).

The kernels themselves live in :mod:`mmtrain.model.varlen_attention` and
:mod:`mmtrain.model.mmca`.

Which implementation a model is built with: the one asked for, or eager where its class cannot run it.

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

import inspect
import logging
import warnings

import torch
import transformers
from torch import nn

from mmtrain.compat import transformers as transformers_compat
from mmtrain.model import mmca, varlen_attention

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


def check_packed_attention(config) -> None:
    """Raise unless transformers' mask builder keeps packed samples apart for this LM's attention.

    Packing relies on ``create_causal_mask`` reading restarts of ``position_ids`` as
    sample boundaries when no 2D mask is given. A transformers release or an attention
    implementation that does not would silently let samples attend to each other, so the
    trainer asks the mask builder itself, with two samples of 3 and 2 tokens, before
    training.
    """
    from mmtrain.compat.transformers import create_causal_mask

    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    offered = {
        "config": config,
        "inputs_embeds": torch.zeros(1, 5, 1),
        "input_embeds": torch.zeros(1, 5, 1),
        "attention_mask": None,
        "cache": None,
        "past_key_values": None,
        "cache_position": torch.arange(5),
        "position_ids": position_ids,
    }
    params = inspect.signature(create_causal_mask).parameters
    try:
        mask = create_causal_mask(**{k: v for k, v in offered.items() if k in params})
    except TypeError as err:  # a mask-builder signature this check does not know: say so, do not block
        warnings.warn(f"packed rows: could not ask transformers' mask builder about packed samples ({err})", stacklevel=2)
        return
    if mask is not None and not isinstance(mask, torch.Tensor):
        return  # a flex-attention BlockMask: built from the same packed-sequence function
    implementation = transformers_compat.attn_implementation(config)
    if varlen_attention.is_varlen_attention(implementation):
        return  # no mask by design: the batch's cu_seq_lens carry the samples' boundaries
    if mask is None:
        allowed = None
    else:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        allowed = allowed.reshape(-1, 5, 5)[0]
    if allowed is None or bool(allowed[3, 2]) or bool(allowed[4, 0]) or not bool(allowed[4, 3]):
        raise ValueError(
            f"packed rows: transformers {transformers.__version__} with attention {implementation!r} does not turn "
            "position_ids restarting at 0 into a per-sample mask, so packed samples would attend to each other; "
            "train without packed rows or with another attention implementation"
        )


def decoder_kwargs(language_model: nn.Module, input_ids: torch.Tensor, image_id: int, offsets=None, longest=None, kv: dict | None = None) -> dict:
    """What one forward's decoder call takes beside the embeddings, for the kernel its LM was switched to.

    MMCA's image-token mask (:func:`mmtrain.model.mmca.mmca_lm_kwargs`), or a packed batch's
    segment offsets for a varlen kernel (:func:`mmtrain.model.varlen_attention.varlen_lm_kwargs`,
    ``offsets`` and ``longest`` being the batch's ``cu_seq_lens`` and ``max_segment_len``, ``kv``
    a shared-prompt batch's key stream, :func:`mmtrain.model.shared_prompt.decoder_inputs`);
    nothing for SDPA, eager or flex attention.
    """
    return {
        **mmca.mmca_lm_kwargs(language_model, input_ids, image_id),
        **varlen_attention.varlen_lm_kwargs(language_model, offsets, longest, input_ids.numel(), kv),
    }
