"""Packed rows' attention through variable-length kernels: the sample boundaries, not a mask.

A packed row (``--max_tokens_per_batch``, ``--packing``) holds several samples, each
attending only to itself. Flex attention gets them as a document block mask and skips
the blocks between samples; a variable-length kernel instead gets the samples'
cumulative offsets in the flattened token stream and runs each as its own causal
sequence, with no mask at all. FlashAttention-2's is the trainer's default on CUDA where
it can run (:func:`mmtrain.model.attention.packed_kernel`): on an H200 its attention took 18%
less time than flex attention on samples of 683-1582 tokens
(``benchmarks/attention_kernels.py``), and float8 ref-7b trained 6.9% faster on them.

Each kernel is registered as a transformers attention implementation
(``mmtrain_varlen_<short name>``) whose mask builder builds no mask for packed batches; the
boundaries reach every layer's attention as two keyword arguments of the decoder call
(the batch's ``cu_seq_lens`` and ``max_segment_len``, see :mod:`mmtrain.batch`), the way
MMCA's image mask does. Batches without them (padded evaluation, generation with a KV
cache) go through SDPA with its usual mask. ``reference`` computes each segment with
SDPA in a loop: any device, for tests.

When every segment of a packed batch has the same length (samples of one fixed length
filling the budget exactly), the stream is a plain batch of equal causal sequences: it
is reshaped, without a copy, to ``[segments, heads, length, dim]`` and goes through
cuDNN's dense causal kernel where it applies (:func:`cudnn_attention_takes`), else
through SDPA's causal kernels. On an H200 that took 35% less time than flex
attention and 39% less than FlashAttention-2's varlen kernel on 2048-token samples
(``attention_kernels_h200_2048.json``), and float8 ref-7b trained 3-4% faster than
through flex attention. The model decides this per batch from shapes
alone (:func:`varlen_lm_kwargs`), so it costs no read-back from the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from mmtrain.compat import torch as torch_compat
from mmtrain.compat import transformers as transformers_compat

# --- FlashAttention-2's variable-length kernel --------------------------------------------
# Reached through its private ops (:mod:`mmtrain.compat.torch`). cuDNN's op takes the same
# offsets, but on torch 2.11 (an H200) it ran at 5 TFLOP/s and its query and key gradients
# were wrong (benchmarks/README.md), so it is not offered.

VARLEN_KERNELS = ("flash_varlen",)
FLASH_ATTENTION_MIN_CAPABILITY = (8, 0)


def flash_attention_problem(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why FlashAttention-2's kernel cannot take ``dtype`` activations on ``device`` (None: it can).

    It needs a CUDA GPU of compute capability >= 8.0 (Ampere on) and 16-bit activations.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the activations are {str(dtype).removeprefix('torch.')}, and it takes bfloat16 or float16"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLASH_ATTENTION_MIN_CAPABILITY:
        return f"the GPU has compute capability {major}.{minor}, and it needs >= 8.0"
    return None


class _VarlenAttention(torch.autograd.Function):
    """Causal attention per segment through FlashAttention-2's forward and backward ops (no weights: no other state)."""

    @staticmethod
    def forward(ctx, q, k, v, offsets, longest, scale, kv_offsets=None, kv_longest=None):
        out, lse, rng_state, unused = torch_compat.flash_attention_forward(q, k, v, offsets, longest, scale, kv_offsets, kv_longest)
        kv = () if kv_offsets is None else (kv_offsets,)
        ctx.save_for_backward(q, k, v, out, lse, rng_state, unused, offsets, *kv)
        ctx.longest, ctx.scale, ctx.kv_longest = longest, scale, kv_longest
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, rng_state, unused, offsets, *kv = ctx.saved_tensors
        dq, dk, dv = torch_compat.flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, offsets, ctx.longest, rng_state, unused, ctx.scale, *kv, ctx.kv_longest if kv else None
        )
        return dq, dk, dv, None, None, None, None, None


def varlen_attention(
    kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int, scale: float | None,
    kv_offsets: torch.Tensor | None = None, kv_longest: int | None = None,
) -> torch.Tensor:
    """Causal attention within each segment of a token stream: ``q`` [T, Hq, D], ``k``/``v`` [T, Hkv, D] (grouped heads as they are).

    ``offsets`` (int32, [S + 1], on the device) are the segments' cumulative starts,
    ``longest`` the longest segment. With ``kv_offsets`` / ``kv_longest`` the keys and values
    are a stream of their own (``k``/``v`` [Tk, Hkv, D]) whose segment i may be longer
    than query segment i: its queries are its last keys (a shared prompt's branch, see
    :mod:`mmtrain.model.shared_prompt`). CUDA only.
    """
    if kernel not in VARLEN_KERNELS:
        raise ValueError(f"varlen kernel {kernel!r}: valid are {', '.join(VARLEN_KERNELS)}")
    offsets = offsets.to(device=q.device, dtype=torch.int32)
    if kv_offsets is not None:
        kv_offsets = kv_offsets.to(device=q.device, dtype=torch.int32)
    return _VarlenAttention.apply(q, k, v, offsets, longest, scale, kv_offsets, kv_longest)


# --- cuDNN's dense causal kernel (packed rows of equal samples) ----------------------------
# SDPA picks FlashAttention first, and inside compiled code its choice cannot be steered to
# cuDNN, so the op is called directly (:func:`mmtrain.compat.torch.cudnn_causal_attention`).

# Asked once: compiled code reads a constant.
_HAS_CUDNN = torch.backends.cudnn.is_available()
# Whether equal-segment rows take cuDNN's kernel where it applies (False: SDPA's own choice).
# Only measurements turn it off (:func:`use_cudnn_dense`).
_cudnn_dense = True


def use_cudnn_dense(enabled: bool) -> None:
    """Let rows of equal samples take cuDNN's dense kernel (the default) or leave them to SDPA's own choice.

    For measuring the kernels against each other; set before the first forward (compiled
    code reads the value when it traces).
    """
    global _cudnn_dense
    _cudnn_dense = bool(enabled)


def cudnn_attention_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`mmtrain.compat.torch.cudnn_causal_attention` can take ``q`` [B, H, L, D] and ``k``: CUDA,
    half precision, as many key as query heads, a head size cuDNN's kernel has (a multiple
    of 8 up to 128). Shapes and dtypes only, so compiled code decides it while tracing."""
    dim = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[1] == q.shape[1]
        and dim % 8 == 0
        and dim <= 128
        and _HAS_CUDNN
        and _cudnn_dense
    )


KERNELS = (*VARLEN_KERNELS, "reference")
VARLEN_ATTENTION_PREFIX = "mmtrain_varlen_"
# The registered names. None may contain "flash": transformers takes any such name for a
# FlashAttention build or a Hub kernel to load (``is_flash_attention_requested``), and on a
# GPU that failed with "Could not find the currently requested flash attention implementation".
_SHORT_NAMES = {"flash_varlen": "fa2", "reference": "reference"}
OFFSETS_KWARG = "mmtrain_cu_seq_lens"
LONGEST_KWARG = "mmtrain_max_segment_len"
SEGMENT_LEN_KWARG = "mmtrain_segment_len"  # instead of the two above: every segment this long
# Shared-prompt pairs (mmtrain.model.shared_prompt): the keys' stream, gathered from the tokens', and its segments.
KV_INDEX_KWARG = "mmtrain_kv_index"
KV_OFFSETS_KWARG = "mmtrain_kv_cu_seq_lens"
KV_LONGEST_KWARG = "mmtrain_max_kv_segment_len"


def is_varlen_attention(implementation: str | None) -> bool:
    """Whether an attention implementation name is one of the variable-length kernels (sample offsets, no mask)."""
    return bool(implementation) and implementation.startswith(VARLEN_ATTENTION_PREFIX)


def implementation(kernel: str) -> str:
    """The attention implementation's name for ``kernel``."""
    if kernel not in KERNELS:
        raise ValueError(f"varlen attention kernel {kernel!r}: valid are {', '.join(KERNELS)}")
    return VARLEN_ATTENTION_PREFIX + _SHORT_NAMES[kernel]


def segments_sdpa(q, k, v, offsets: torch.Tensor, scale: float | None = None, kv_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention within each segment, one SDPA call per segment: ``q`` [T, Hq, D], ``k``/``v`` [T, Hkv, D].

    Slow and exact, on any device: the ``reference`` kernel, and what the attention bench
    compares the GPU kernels with. ``kv_offsets``: the keys' own segments, each query
    segment being its key segment's last positions (as :func:`varlen_attention`).
    """
    bounds = offsets.tolist()
    kv_bounds = bounds if kv_offsets is None else kv_offsets.tolist()
    outs = []
    for start, end, kv_start, kv_end in zip(bounds[:-1], bounds[1:], kv_bounds[:-1], kv_bounds[1:]):
        qs = q[start:end].transpose(0, 1).unsqueeze(0)
        ks, vs = (t[kv_start:kv_end].transpose(0, 1).unsqueeze(0) for t in (k, v))
        # causal, aligned to the last key: query j sees keys up to (keys - queries) + j
        mask = torch.ones(end - start, kv_end - kv_start, dtype=torch.bool, device=q.device).tril(kv_end - kv_start - (end - start))
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=ks.shape[1] != qs.shape[1])
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def equal_segments_sdpa(query, key, value, segment: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention within consecutive segments of ``segment`` tokens: ``query`` [B, Hq, L, D], ``key``/``value`` [B, Hkv, L, D].

    Each row's ``L`` tokens are ``L / segment`` whole segments. Returns [B, L, Hq, D] (the
    layout transformers' attention functions return). Splitting the sequence axis and
    moving the pieces into the batch is a view for one row, whatever the tensors' strides.
    """
    batch, heads, length, dim = query.shape

    def split(t):  # [B, H, L, D] -> [B * L / segment, H, segment, D]
        return t.unflatten(2, (length // segment, segment)).transpose(1, 2).flatten(0, 1)

    q, k, v = split(query), split(key), split(value)
    if cudnn_attention_takes(q, k):
        out = torch_compat.cudnn_causal_attention(q, k, v, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != heads)
    return out.transpose(1, 2).reshape(batch, length, heads, dim)


def _attention(kernel: str, sdpa, module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    offsets, longest = kwargs.pop(OFFSETS_KWARG, None), kwargs.pop(LONGEST_KWARG, None)
    segment = kwargs.pop(SEGMENT_LEN_KWARG, None)
    kv_index, kv_offsets, kv_longest = (kwargs.pop(name, None) for name in (KV_INDEX_KWARG, KV_OFFSETS_KWARG, KV_LONGEST_KWARG))
    if offsets is None and segment is None:
        # Not a packed batch (padded evaluation, generation with a cache): SDPA, with the mask
        # _mask built for it.
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"attention {implementation(kernel)!r} has no attention dropout (the LM config asks for {dropout})")
    for name in ("sliding_window", "softcap"):  # the builder keeps such models on flex attention (see unsupported)
        if kwargs.get(name) is not None:
            raise ValueError(f"attention {implementation(kernel)!r} cannot apply the layer's {name}={kwargs[name]}")
    if segment is not None:
        return equal_segments_sdpa(query, key, value, segment, scaling), None
    batch, heads, length, dim = query.shape
    # [B, H, L, D] -> the flattened stream [B * L, H, D]; the offsets count rows end to end.
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (key, value))
    if kv_index is not None:
        # Each branch's keys are its prompt's and its own, gathered into one segment
        # (backward: index_add into the tokens' keys, so the prompt's collect both branches').
        k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
    if kernel == "reference":
        out = segments_sdpa(q, k, v, offsets, scaling, kv_offsets)
    else:
        out = varlen_attention(kernel, q, k, v, offsets, longest, scaling, kv_offsets, kv_longest)
    return out.reshape(batch, length, heads, dim), None


def _mask(*args, attention_mask=None, **kwargs):
    """No mask for packed batches (they come without a 2D mask; their boundaries travel as
    offsets, and a mask would only be built to be ignored); SDPA's otherwise, for the SDPA
    the attention falls back to on unpacked batches."""
    if attention_mask is None:
        return None
    return transformers_compat.attention_mask_builder("sdpa")(*args, attention_mask=attention_mask, **kwargs)


def _attention_function(kernel: str):
    sdpa = AttentionInterface()["sdpa"]  # transformers' own, for unpacked batches

    def attention(module, query, key, value, attention_mask, **kwargs):
        return _attention(kernel, sdpa, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{kernel}_attention_forward"
    return attention


def register(kernel: str) -> str:
    """Make ``kernel`` a transformers attention implementation (idempotent); returns its name."""
    name = implementation(kernel)
    AttentionInterface.register(name, _attention_function(kernel))
    transformers_compat.register_attention_mask(name, _mask)
    return name


def unsupported(config) -> str | None:
    """Why these kernels cannot compute the attention of an LM with ``config`` (None: they can).

    They run every segment as plain causal attention: a sliding window (Mistral, Gemma's
    local layers, Qwen2 with ``use_sliding_window``) or capped attention logits (Gemma 2)
    would be silently dropped, so such models keep flex attention, whose masks transformers
    builds per layer type.
    """
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention"}
    if kinds:
        return f"its layers include {', '.join(sorted(kinds))} (layer_types)"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"it attends within a sliding window of {window} tokens (sliding_window)"
    if getattr(config, "attn_logit_softcapping", None):
        return f"it caps attention logits at {config.attn_logit_softcapping} (attn_logit_softcapping)"
    return None


def uses_varlen(language_model: nn.Module) -> bool:
    return is_varlen_attention(transformers_compat.attn_implementation(getattr(language_model, "config", None)))


def varlen_lm_kwargs(language_model: nn.Module, offsets: torch.Tensor | None, longest: int | None, tokens: int, kv: dict | None = None) -> dict:
    """Keyword arguments for the decoder call when a varlen kernel is on (else nothing).

    A packed batch of ``tokens`` positions in all passes its segments' offsets, or only
    their length when all are equal. The segments' lengths sum to ``tokens`` and none
    exceeds ``longest``, so they are all equal exactly when there are ``tokens / longest``
    of them: a test of shapes, with nothing read back from the GPU. ``kv``: a shared-prompt
    batch's key stream (:data:`KV_INDEX_KWARG` and the two after it), passed along.
    """
    if offsets is None or not uses_varlen(language_model):
        return {}
    if longest is None:
        raise ValueError("a packed batch's cu_seq_lens come with max_segment_len (mmtrain.batch)")
    longest = int(longest)
    if kv:
        return {OFFSETS_KWARG: offsets, LONGEST_KWARG: longest, **kv}
    if (offsets.shape[0] - 1) * longest == tokens:
        return {SEGMENT_LEN_KWARG: longest}
    return {OFFSETS_KWARG: offsets, LONGEST_KWARG: longest}
