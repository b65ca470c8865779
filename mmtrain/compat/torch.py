"""torch internals: the async assert, the batch-norm base class, an inductor switch, and the private attention and float8 ops.

The private ops (``_scaled_mm``, ``_flash_attention_forward/backward``,
``_scaled_dot_product_cudnn_attention``) are called here and only here, by their schemas,
which ``tests/test_compat.py`` pins; what is built on them (float8 layers, the packed-row
attention) lives with its users in :mod:`mmtrain.model.fp8` and
:mod:`mmtrain.model.varlen_attention`.
"""

from __future__ import annotations

import torch
from torch import nn


def assert_async(condition: torch.Tensor, message: str) -> None:
    """Fail when the one-element ``condition`` is false, without the host waiting for the device.

    ``torch._assert_async`` is the only check torch offers that does not copy the value
    back to the host: on an accelerator the failure surfaces at a later kernel launch,
    on CPU it raises ``RuntimeError(message)`` at once. ``assert`` and ``torch._check``
    need a Python bool, i.e. a device sync per training step. If it disappeared,
    ``VisionLanguageModel.embed`` could not check image spans against image features
    during accelerator training without stalling every step.
    """
    torch._assert_async(condition, message)


# The common base of BatchNorm1d/2d/3d, their Lazy variants and SyncBatchNorm; torch has
# no public name for it. The optimizer's no-decay grouping tests for it; were it renamed,
# mmtrain.training.optim would fail at its first call (AttributeError), not silently.
BatchNormBase: type[nn.Module] = nn.modules.batchnorm._BatchNorm


def disable_inductor_matmul_padding() -> None:
    """Turn off inductor's matmul shape padding (``torch._inductor.config.shape_padding``).

    Why: its pass (``fx_passes/pad_mm.py``, torch 2.11 and 2.13) crashes compiling an
    ``addmm`` whose bias has a symbolic size (``SymIntArrayRef expected to contain only
    concrete integers`` from ``torch.randn_like``) whenever the product's base timing is
    already in its cache, which another compile of the same shapes (another layer, another
    run sharing the inductor cache) fills. Decoder layers compile with a dynamic token count,
    so training failed at its first step now and then on a GPU (seen twice in the GPU tier,
    in different rows). The pass only pads widths that are not multiples of 8 or 16;
    real models' layers have none, so nothing is lost there. If a release renames the
    option, setting it raises (the test in ``tests/test_compat.py`` says so first).
    """
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "shape_padding"):
        raise AttributeError("torch._inductor.config.shape_padding is gone: see mmtrain.compat.torch.disable_inductor_matmul_padding")
    inductor_config.shape_padding = False


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm(a, b, scale_a=, scale_b=, out_dtype=)``: the float8 tensor-core GEMM (cuBLASLt on CUDA).

    torch's only entry to it; private, and its contract has changed between releases (it
    returned an ``(out, amax)`` pair before torch 2.5; row-wise scales came in 2.5).
    :func:`mmtrain.model.fp8.float8_matmul` lays out the operands and scales for it.
    """
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


# --- FlashAttention-2's variable-length ops ----------------------------------------------
# The ops SDPA and ``torch.nn.attention.varlen`` call. ``varlen_attn`` takes variable-length
# rows publicly, but its signature has changed between releases (``is_causal`` became
# ``window_size``), so the ops are reached through their own schemas, which a test pins.


def flash_attention_forward(q, k, v, offsets: torch.Tensor, longest: int, scale: float | None, kv_offsets=None, kv_longest=None):
    """Causal attention per segment, no dropout: ``(out, logsumexp, rng_state, unused)`` for the backward.

    ``kv_offsets`` / ``kv_longest``: the key segments, when they are not the query segments
    (a segment's queries are then the last of its keys: FlashAttention-2 aligns the causal
    mask to the bottom right where a segment has more keys than queries).
    """
    kv_offsets, kv_longest = (offsets, longest) if kv_offsets is None else (kv_offsets, kv_longest)
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, offsets, kv_offsets, longest, kv_longest, 0.0, True, False, scale=scale
    )
    return out, lse, rng_state, unused


def flash_attention_backward(
    grad, q, k, v, out, lse, offsets: torch.Tensor, longest: int, rng_state, unused, scale: float | None, kv_offsets=None, kv_longest=None
):
    """The gradients ``(dq, dk, dv)`` of :func:`flash_attention_forward`."""
    kv_offsets, kv_longest = (offsets, longest) if kv_offsets is None else (kv_offsets, kv_longest)
    return torch.ops.aten._flash_attention_backward(
        grad, q, k, v, out, lse, offsets, kv_offsets, longest, kv_longest, 0.0, True, rng_state, unused, scale=scale
    )


def cudnn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of ``q``/``k``/``v`` [B, H, L, D] through cuDNN's op (the one SDPA dispatches to); [B, H, L, D].

    Called directly because SDPA's own choice cannot be steered to it inside compiled code
    on torch 2.11 (``sdpa_kernel(..., set_priority=True)`` still ran FlashAttention). It
    has its own backward.
    """
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[0]
