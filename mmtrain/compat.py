"""Every use of a private or undocumented API of torch, transformers, peft, accelerate, DeepSpeed, datasets or the standard library.

Nothing else in mmtrain reaches past a library's public surface: when it must, it goes
through a helper here, whose comment says why we need the private thing and what breaks
if a release changes it. ``tests/test_compat.py`` checks each one against the installed
releases (on CPU, without mocks), and the upper bounds in ``pyproject.toml`` name the
newest releases those checks passed on. Raising a bound means running those tests first.

Only torch is imported at module level. transformers and peft (peft imports accelerate)
load on first use, and deepspeed only inside the functions that need it: its import is
slow and must come after ``DS_ACCELERATOR`` is set
(:func:`mmtrain.training.distributed.prepare_environment`), which happens after
``mmtrain.training.distributed`` itself is imported. Library functions re-exported
unchanged (``repeat_kv``, ``create_causal_mask``, DeepSpeed's estimators) are resolved
lazily by the module ``__getattr__`` at the bottom, so an importer gets the library's
own function, with no wrapper on a hot path.

This module must not import ``mmtrain.args`` or ``mmtrain.data``.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers.integrations.sdpa_attention import repeat_kv  # noqa: F401
    from transformers.masking_utils import create_causal_mask  # noqa: F401


# --- torch ------------------------------------------------------------------------------


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


# --- torch: float8 matrix products -------------------------------------------------------
#
# ``torch._scaled_mm`` is torch's only entry to the float8 tensor-core GEMM (cuBLASLt on
# CUDA); it is private and its contract has changed between releases (it returned an
# ``(out, amax)`` pair before torch 2.5; row-wise scales came in 2.5). Everything that
# depends on that contract is in this block: the operand layout, the alignment, the scale
# shapes and the hardware that runs it. ``mmtrain.model.fp8`` only calls
# :func:`float8_matmul`.

FLOAT8 = torch.float8_e4m3fn  # 4 exponent bits, 3 mantissa bits: the format for weights and activations
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448: the largest finite value
# cuBLASLt's float8 kernels need the reduction and output widths to be multiples of 16.
FLOAT8_ALIGNMENT = 16
# float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FLOAT8_MIN_CAPABILITY = (8, 9)


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
        raise AttributeError("torch._inductor.config.shape_padding is gone: see mmtrain.compat.disable_inductor_matmul_padding")
    inductor_config.shape_padding = False


def float8_matmul(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b).T`` from float8 ``a`` [M, K] and ``b`` [N, K], both row-major.

    ``scale_a`` is [M, 1] and ``scale_b`` [1, N], float32: one scale per row of each
    operand (``_scaled_mm``'s row-wise mode; it multiplies them back onto the product).
    ``_scaled_mm`` wants its second operand column-major, i.e. [K, N] with K contiguous,
    which ``b.t()`` is without a copy: both operands must be K-major ("TN"), the only
    layout cuBLASLt's float8 kernels take. Row-wise scaling on CUDA needs a bfloat16
    output. K and N must be multiples of :data:`FLOAT8_ALIGNMENT`; M is free.
    Were the signature or the layout rule changed, ``tests/test_compat.py`` fails on it.
    """
    if a.dtype != FLOAT8 or b.dtype != FLOAT8:
        raise ValueError(f"float8_matmul takes {FLOAT8} operands, got {a.dtype} and {b.dtype}")
    if a.shape[1] != b.shape[1] or a.shape[1] % FLOAT8_ALIGNMENT or b.shape[0] % FLOAT8_ALIGNMENT:
        raise ValueError(f"float8_matmul: [M, K] @ [N, K].T needs equal K and K, N multiples of {FLOAT8_ALIGNMENT}, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch._scaled_mm(
        a.contiguous(), b.contiguous().t(), scale_a=scale_a.reshape(-1, 1).float(), scale_b=scale_b.reshape(1, -1).float(),
        out_dtype=out_dtype,
    )


_ROW_WISE: dict[str, bool] = {}


def float8_row_wise_runs(device: torch.device | str) -> bool:
    """Whether this torch's ``_scaled_mm`` takes row-wise scales on ``device``'s kind (a 16x16 probe, asked once).

    CPU support came late: torch 2.11's CPU backend takes one scale per tensor only, 2.13's
    also one per row. Training never computes float8 on a CPU (:func:`float8_matmul_problem`
    refuses it); the tests that check the float8 numbers on a CPU ask this first.
    """
    kind = torch.device(device).type
    if kind not in _ROW_WISE:
        try:
            a = torch.ones(16, 16, device=kind).to(FLOAT8)
            float8_matmul(a, a, torch.ones(16, 1, device=kind), torch.ones(1, 16, device=kind), torch.bfloat16)
            _ROW_WISE[kind] = True
        except (RuntimeError, NotImplementedError):
            _ROW_WISE[kind] = False
    return _ROW_WISE[kind]


def float8_matmul_problem(device: torch.device | str) -> str | None:
    """Why :func:`float8_matmul` cannot run fast on ``device`` (None: it can).

    torch's CPU ``_scaled_mm`` computes the right numbers (the tests use it) but without
    float8 hardware it is slower than bfloat16, so training refuses it: a CPU or a GPU
    below compute capability 8.9 is named with what was found.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device is {device.type}, and float8 matrix products need a CUDA GPU of compute capability >= 8.9"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FLOAT8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        need = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
        return f"the GPU is {name} (compute capability {major}.{minor}), and float8 matrix products need >= {need}"
    return None


# --- torch: variable-length attention kernel (packed rows) -------------------------------
# Packed rows can pass their sample boundaries to FlashAttention-2's variable-length kernel
# instead of a mask (mmtrain/model/varlen_attention.py). It is torch's private op, the one
# SDPA and ``torch.nn.attention.varlen`` call: ``varlen_attn`` takes variable-length rows
# publicly, but its signature has changed between releases (``is_causal`` became
# ``window_size``), so the op is reached here through its own schema, which a test pins.
# cuDNN's op takes the same offsets, but on torch 2.11 (an H200) it ran at 5 TFLOP/s and
# its query and key gradients were wrong (benchmarks/README.md), so it is not offered.

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
    def forward(ctx, q, k, v, offsets, longest, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, offsets, offsets, longest, longest, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, rng_state, unused, offsets)
        ctx.longest, ctx.scale = longest, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, rng_state, unused, offsets = ctx.saved_tensors
        n = ctx.longest
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, offsets, offsets, n, n, 0.0, True, rng_state, unused, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None


def varlen_attention(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int, scale: float | None) -> torch.Tensor:
    """Causal attention within each segment of a token stream: ``q`` [T, Hq, D], ``k``/``v`` [T, Hkv, D] (grouped heads as they are).

    ``offsets`` (int32, [S + 1], on the device) are the segments' cumulative starts,
    ``longest`` the longest segment. CUDA only.
    """
    if kernel not in VARLEN_KERNELS:
        raise ValueError(f"varlen kernel {kernel!r}: valid are {', '.join(VARLEN_KERNELS)}")
    offsets = offsets.to(device=q.device, dtype=torch.int32)
    return _VarlenAttention.apply(q, k, v, offsets, longest, scale)


# --- torch: cuDNN's dense causal attention (packed rows of equal samples) ------------------
# Rows whose samples all have one length are dense causal batches
# (mmtrain/model/varlen_attention.py), and cuDNN's kernel took 35% less time than flex
# attention there on an H200. SDPA picks FlashAttention first; its choice can be steered with
# ``sdpa_kernel(..., set_priority=True)``, but in a compiled function on torch 2.11 (an H200)
# FlashAttention still ran, so the op SDPA itself dispatches to is called here, by its
# schema, which a test pins. It has its own backward.
# MMTRAIN_CUDNN_ATTENTION=0 leaves those rows to SDPA's own choice (for measuring,
# benchmarks/gpu_suite.sh equal-segments).

# Asked once: compiled code reads a constant.
_HAS_CUDNN = torch.backends.cudnn.is_available() and os.environ.get("MMTRAIN_CUDNN_ATTENTION", "1") != "0"


def cudnn_attention_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`cudnn_causal_attention` can take ``q`` [B, H, L, D] and ``k``: CUDA,
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
    )


def cudnn_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of ``q``/``k``/``v`` [B, H, L, D] through cuDNN (see :func:`cudnn_attention_takes`); [B, H, L, D]."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[0]


# --- transformers: attention implementation and masks ----------------------------------


def attn_implementation(config) -> str | None:
    """The attention implementation a transformers model actually dispatches to (None if unknown).

    transformers keeps the resolved choice (after ``from_pretrained``'s checks and
    ``set_attn_implementation``) only in the private ``config._attn_implementation``;
    the public ``attn_implementation`` argument is consumed at load time. MMCA reads it
    to know whether it is active (and so whether to pass the image-token mask), packing
    to name the implementation in its error, export to refuse MMCA models. If the field
    were renamed this would return None and MMCA would silently run as plain causal
    attention, hence the test.
    """
    return getattr(config, "_attn_implementation", None)


# The class flags transformers checks before it lets a model run an attention
# implementation (``PreTrainedModel.get_correct_attn_implementation``): asked for
# explicitly, an implementation whose flag is False is a ValueError at construction.
_ATTENTION_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def supports_attention(model_class: type, name: str) -> bool:
    """Whether transformers lets ``model_class`` run attention implementation ``name`` (eager always).

    Read from the private class flags ``_supports_sdpa`` / ``_supports_flex_attn``, which
    transformers itself checks, so that the choice is made from the class before any
    weights load. Were a flag renamed this would answer False, and mmtrain would run
    such a model with eager attention: slower, never wrong (the test catches it).
    """
    if name == "eager":
        return True
    flag = _ATTENTION_SUPPORT_FLAGS.get(name)
    if flag is None:
        raise ValueError(f"unknown attention implementation {name!r}: known are eager, {', '.join(_ATTENTION_SUPPORT_FLAGS)}")
    return bool(getattr(model_class, flag, False))


def embedding_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor a transformers embedding table multiplies its rows by (Gemma's ``sqrt(hidden)``), or None.

    Gemma, Gemma 2 and Gemma 3 look up through a ``...ScaledWordEmbedding`` whose forward
    multiplies by its undocumented ``embed_scale`` buffer. mmtrain's trainable new-token
    rows sit beside the table (``NewTokenEmbedding``) and must be scaled alike, since an
    export writes them into the table. Were the buffer renamed this would answer None and
    the new tokens would read unscaled rows in training only (the test catches it).
    """
    scale = getattr(embedding, "embed_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def sdpa_mask_materialized(*args, **kwargs) -> torch.Tensor:
    """transformers' SDPA boolean mask ``[batch, 1, q, kv]`` (True: attend), always built, never None.

    ``transformers.masking_utils.sdpa_mask`` returns None for a plain causal mask so that
    SDPA can use ``is_causal``; ``allow_is_causal_skip=False`` (an undocumented keyword
    of that internal builder) turns that off. MMCA intersects this mask with its
    text/image masks, so it asks for it even when it is plain causal. ``sdpa_mask``
    takes ``**kwargs``: were the keyword dropped or renamed, it would be swallowed
    silently and MMCA would be handed None again.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def attention_mask_builder(name: str) -> Callable[..., torch.Tensor | None]:
    """The mask builder transformers registered for attention implementation ``name`` (e.g. ``"sdpa"``).

    Looked up through ``AttentionMaskInterface`` (see :func:`register_attention_mask`); it
    takes the keyword arguments of the internal ``sdpa_mask``.
    """
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionMaskInterface()[name]


def register_attention_mask(name: str, mask_function: Callable[..., torch.Tensor | None]) -> None:
    """Make ``mask_function`` the mask builder of attention implementation ``name``.

    ``AttentionMaskInterface`` lives in ``transformers.masking_utils`` and is described
    only in the attention-interface guide; the keyword arguments it passes to the
    function (``batch_size``, ``q_length``, ``kv_length``, ``attention_mask``,
    ``allow_is_causal_skip``, ...) are those of the internal ``sdpa_mask``. Without a
    registered builder, transformers has no mask for a custom attention (MMCA) and its
    models fail in ``create_causal_mask``.
    """
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(name, mask_function)


# --- peft: LoRA layer internals ---------------------------------------------------------
#
# Fused LoRA replaces the forward of peft's LoRA ``Linear`` and therefore reads the layer
# state peft's own forward reads (the adapter dicts and the enabled/merged/active flags);
# LoRA export merges from peft's state-dict names. None of this is documented API. A
# renamed attribute raises AttributeError in the first forward; a changed *meaning*
# (e.g. ``scaling`` no longer alpha / r, dropout no longer Identity when off) would make
# fused LoRA compute something other than peft, which the tests compare.


def lora_runs_one_plain_adapter(layer, adapter: str) -> bool:
    """Whether peft's forward of ``layer`` adds exactly ``base(x) + scale * B(A(x))`` for ``adapter``.

    That is: adapters enabled and not merged into the base weight, ``adapter`` the only
    active one, no variant (DoRA, aLoRA, ...) and no dropout (peft puts ``nn.Identity``
    there when ``lora_dropout`` is 0).
    """
    if layer.disable_adapters or layer.merged or list(layer.active_adapters) != [adapter]:
        return False
    return adapter not in getattr(layer, "lora_variant", {}) and isinstance(layer.lora_dropout[adapter], nn.Identity)


def lora_parts(layer, adapter: str) -> tuple[nn.Module, nn.Module, nn.Module, float]:
    """``(base layer, lora_A, lora_B, scale)`` of one adapter of a peft LoRA layer."""
    return layer.base_layer, layer.lora_A[adapter], layer.lora_B[adapter], layer.scaling[adapter]


def is_lora_linear(module: nn.Module, adapter: str) -> bool:
    """Whether ``module`` is peft's LoRA ``Linear`` carrying ``adapter`` (what fused LoRA can replace).

    ``peft.tuners.lora.Linear`` and ``LoraLayer`` (the base of every LoRA layer) are
    exported by ``peft.tuners.lora`` but are not part of peft's documented API.
    """
    from peft.tuners.lora import Linear

    return isinstance(module, Linear) and adapter in module.lora_A


def lora_scaling(module: nn.Module, adapter: str) -> float | None:
    """``alpha / r`` of ``adapter`` on a peft LoRA layer; None for any other module."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer) and adapter in module.scaling:
        return module.scaling[adapter]
    return None


def wrap_lora_input_cast(module: nn.Module, wrap: Callable[[Callable], Callable]) -> bool:
    """Replace a peft LoRA layer's input cast ``f`` by ``wrap(f)``; returns whether ``module`` had one.

    peft's LoRA forward casts the layer input to the adapter dtype through the private
    method ``_cast_input_dtype(x, dtype)``; replacing it on the instance is the only way
    to skip that cast only while autocast is on (peft's public
    ``peft.helpers.disable_input_dtype_casting`` turns it off with or without autocast,
    and without autocast an fp32 adapter cannot take a half-precision input). If peft
    stopped routing the cast through this method, the wrapper would be ignored:
    mixed-precision runs would be slower, not wrong.
    """
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer) and hasattr(module, "_cast_input_dtype"):
        module._cast_input_dtype = wrap(module._cast_input_dtype)
        return True
    return False


# Names peft gives an adapted layer's tensors in a state dict:
#   "{layer}.base_layer.weight", "{layer}.lora_A.{adapter}.weight", "{layer}.lora_B.{adapter}.weight".
# Merging LoRA into an export finds the base weight and the adapters by these names; if
# they changed, an export would silently keep the unmerged base weights.
LORA_NAME_MARK = ".lora_"
BASE_LAYER_MARK = ".base_layer."


def lora_weight_names(layer: str, adapter: str) -> tuple[str, str]:
    """State-dict names of ``(A, B)`` of ``adapter`` on the adapted layer named ``layer``."""
    return f"{layer}.lora_A.{adapter}.weight", f"{layer}.lora_B.{adapter}.weight"


# --- bitsandbytes: its CPU backend's import-time notice ------------------------------------
#
# bitsandbytes' CPU backend, on CPUs with AVX512-BF16, tries to load a faster 4-bit kernel
# from the optional ``kernels`` package when it is imported, and logs a warning on the
# logger of its module ``bitsandbytes.backends.cpu.ops`` when that package is absent; it
# then uses its own kernel, with the same numbers. peft imports bitsandbytes whenever it is
# installed, so that line would open the output of every mmtrain command (whose contract
# is one error line on bad input), NF4 or not. The logger's name is the module's path, not
# an API: if it moved, the line would come back (tests/test_compat.py checks it does not).
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def quiet_bitsandbytes_cpu_notice() -> None:
    """Keep bitsandbytes' CPU backend to errors on its logger (works before or after its import)."""
    import logging

    logging.getLogger(BITSANDBYTES_CPU_LOGGER).setLevel(logging.ERROR)


# --- DeepSpeed: ZeRO-3 parameter attributes ---------------------------------------------
#
# ZeRO-3 (``deepspeed.zero.Init``) turns each parameter into a local shard, ``numel() ==
# 0`` outside a gather, and records the full tensor's facts in ``ds_*`` attributes. They
# are read by getattr because a plain parameter has none of them.


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (gathered by DeepSpeed's hooks, not whole).

    Every partitioned parameter carries ``ds_id``. Read by fused LoRA, which must fall
    back to peft's forward there (the base weight is gathered around ``base_layer``'s
    own forward), and by the new-token embedding, which must gather before reading
    rows. Were it renamed, both would take a partitioned weight for a whole one.
    """
    return hasattr(param, "ds_id")


def zero3_gathered(param: torch.Tensor) -> bool:
    """Whether ``param`` holds its whole value now: not partitioned, or gathered by ZeRO-3 at this moment.

    A partitioned parameter's local tensor is empty outside a gather and has its full
    shape (``ds_shape``) inside one, e.g. within a decoder layer marked as a ZeRO-3 leaf
    module, whose pre-forward hook gathers every weight of the layer at once. Read by
    fused LoRA, which uses the base weight directly instead of calling ``base_layer``.
    """
    shape = getattr(param, "ds_shape", None)
    return shape is None or param.shape == shape


def full_numel(param: torch.Tensor) -> int:
    """Element count of the whole parameter, also when ZeRO-3 holds only a shard of it.

    A partitioned parameter's ``numel()`` is its (empty) local view; ``ds_numel`` is the
    full count. Were it renamed, parameter counts (logs, budgets) would read 0 at ZeRO-3.
    """
    return int(getattr(param, "ds_numel", param.numel()))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter, also when ZeRO-3 holds only a shard of it (``ds_shape``).

    Read by the portable checkpoint state, which writes each tensor's shape before any
    value is gathered; were it renamed, ZeRO-3 shapes would be written empty.
    """
    return tuple(getattr(param, "ds_shape", param.shape))


# --- accelerate + transformers: the DeepSpeed config transformers sees ------------------
#
# ``from_pretrained`` builds weights under ``deepspeed.zero.Init`` when transformers holds
# a ZeRO-3 config, which it keeps through a weak reference set by
# ``transformers.integrations.deepspeed.set_hf_deepspeed_config``; accelerate's
# ``DeepSpeedPlugin`` owns the referenced object as ``plugin.dschf`` and creates it in
# ``set_deepspeed_weakref()``. Neither is documented.


def zero3_init_enabled(plugin) -> bool:
    """Whether models are built partitioned (``zero.Init``) under accelerate's DeepSpeed ``plugin``.

    ``DeepSpeedPlugin.zero3_init_flag`` is documented as an input; we read it after the
    plugin has resolved it, relying on it being True only at ZeRO stage 3 (accelerate
    turns it off at other stages).
    """
    return bool(plugin.zero3_init_flag)


def unset_hf_deepspeed_config() -> None:
    """Drop the DeepSpeed config transformers holds, so ``is_deepspeed_zero3_enabled()`` is False.

    A private helper of ``transformers.integrations.deepspeed`` (made for unit tests).
    We use it to load the frozen vision encoder whole at ZeRO-3: accelerate's own
    ``zero3_init_context_manager(enable=False)`` re-installs the stage-3 config, so
    ``from_pretrained`` would still partition. If it stopped clearing the config, the
    encoder would be partitioned outside the engine and never gathered.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config as unset

    unset()


def reinstall_hf_deepspeed_config(plugin) -> None:
    """Hand transformers a fresh copy of ``plugin.deepspeed_config`` (what ``zero.Init`` will read).

    Needed after we edit the config following the Accelerator's creation (the stage-3
    persistence threshold), and to restore it after :func:`unset_hf_deepspeed_config`.
    Dropping ``plugin.dschf`` first mirrors accelerate's own context manager; the new
    object must stay referenced by the plugin or transformers' weak reference dies.
    """
    plugin.dschf = None
    plugin.set_deepspeed_weakref()


# --- accelerate ---------------------------------------------------------------------------


def set_sync_gradients(accelerator, sync: bool) -> None:
    """Say whether the coming backward ends an optimizer step, as ``accelerator.accumulate`` would.

    The token-weighted loss reads a whole step's micro-batches before running the first
    (it needs their label count). ``accumulate`` decides the boundary from a step counter
    and from the loader having yielded its last batch, which the read-ahead reaches too
    early. Accelerate keeps the flag only behind the private
    ``GradientState._set_sync_gradients``; everything downstream reads it: the wrapped
    optimizer and schedule step only when it is set, and under DeepSpeed the engine's
    accumulation boundary and ``step`` follow it. Were it renamed this raises
    AttributeError at the first step, hence the test.
    """
    accelerator.gradient_state._set_sync_gradients(sync)


# --- optimizer state behind Accelerate's and DeepSpeed's wrappers ---------------------
#
# A resume on another process count writes each trainable parameter's Adam moments and
# step back into a freshly built engine. DeepSpeed's public setters
# (``deepspeed.utils.safe_set_full_optimizer_state``) write into state that must already
# exist, and ZeRO 1/2 and the bf16 optimizer create it at their first step. The helpers
# below create it as that first step would.


def base_optimizer(optimizer):
    """The optimizer that holds the Adam state: torch's AdamW or DeepSpeed's CPU Adam.

    Accelerate's ``AcceleratedOptimizer`` keeps what it wraps as ``.optimizer``; under
    DeepSpeed that is the ZeRO (or bf16) optimizer, which keeps the base optimizer as
    ``.optimizer`` too; the base optimizer has no such attribute. Were either renamed, this
    would return a wrapper and :func:`create_adam_state` would raise on its missing state.
    """
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _ds_cpu_adam(optimizer) -> bool:
    return type(optimizer).__name__ == "DeepSpeedCPUAdam"


def adam_step_count(optimizer) -> int | None:
    """The steps the base optimizer has applied (None before its first): every parameter's state counts the same."""
    for state in base_optimizer(optimizer).state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return None


def create_adam_state(optimizer, step: int) -> None:
    """Give every parameter of the base optimizer the state its first step would create, at ``step``.

    Zero moments; ``step`` as the optimizer keeps it: a 0-d float tensor for torch's Adam
    family (on the CPU unless ``fused``/``capturable``, as ``torch.optim.adam`` lays it
    out), a Python int for DeepSpeed's CPU Adam. State that exists keeps its moments and
    gets the step. Under a ZeRO 1/2 or bf16 optimizer, the wrapper must then be linked to
    the new state (:func:`link_zero_optimizer_state`).
    """
    base = base_optimizer(optimizer)
    cpu_adam = _ds_cpu_adam(base)
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    tensors = {id(p): p for g in base.param_groups for p in g["params"]}
    # ZeRO-3 empties the base optimizer's groups between steps and keeps the fp32
    # partitions it steps (the keys of the base state) in ``fp32_partitioned_groups_flat``.
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "fp32_partitioned_groups_flat"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is not None:
        tensors.update({id(p): p for p in wrapper.fp32_partitioned_groups_flat})
    for p in tensors.values():
        state = base.state[p]
        if "exp_avg" not in state:
            dtype = torch.float32 if cpu_adam else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if cpu_adam:
            state["step"] = int(step)
        else:
            state["step"] = torch.tensor(float(step), dtype=scalar, device=p.device if on_device else "cpu")


def fp32_masters(optimizer) -> dict[int, tuple[torch.Tensor, int]]:
    """Where DeepSpeed's ZeRO-0 mixed-precision optimizers keep each parameter's fp32 master.

    ``{id(param): (tensor the base optimizer steps, offset of the parameter in it)}``.
    At ZeRO 0 with bf16 or fp16, DeepSpeed wraps the optimizer in ``FP16_Optimizer``
    (fused: one flat fp32 copy per group, ``fp32_groups_flat``, the parameters
    ``fp16_groups[i]`` laid out in order without padding) or ``FP16_UnfusedOptimizer``
    (one fp32 copy per parameter, ``fp32_groups``). Neither links parameters to their
    masters for ``safe_get_full_fp32_param``, which returns None there. Empty for any
    other optimizer. Were the attributes renamed, a resume on another count would read
    the compute-dtype weights and no moments; the compat test compares the masters with
    the weights to catch that.
    """
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "fp16_groups"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is None:
        return {}
    found = {}
    if hasattr(wrapper, "fp32_groups_flat"):
        for group, flat in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat):
            offset = 0
            for p in group:
                found[id(p)] = (flat, offset)
                offset += p.numel()
    elif hasattr(wrapper, "fp32_groups"):
        for group, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            found.update({id(p): (m, 0) for p, m in zip(group, masters)})
    return found


def link_zero_optimizer_state(optimizer) -> None:
    """Point a ZeRO 1/2 or bf16 optimizer's per-parameter views at the base optimizer's state.

    ``_lazy_init_hp_params_optimizer_state`` is what those optimizers run after their
    first step, once (the ``_hp_optimizer_states_linked`` flag keeps it from running
    again); DeepSpeed's ``safe_get/set_full_optimizer_state`` read and write through the
    views it makes. DeepSpeed 0.19 runs it after stepping the *first* parameter group, when
    the other groups have no state yet, so their parameters get no views and
    ``safe_get_full_optimizer_state`` raises "exp_avg not found" for them. Clearing the
    flag and linking again once every group has state makes the views for all; it only
    creates views, so training is unchanged. ZeRO-3 reads the base state directly and has
    no such method. Were either name changed, the getters would raise as above; the
    compat test catches that first.
    """
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is not None:
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


# --- the standard library ----------------------------------------------------------------


def tar_member_data_offset(member) -> int:
    """Where a tar member's bytes start in its archive (``TarInfo.offset_data``).

    A streamed tar shard's buffer keeps where each image lies instead of its bytes, so
    that a checkpoint of the buffer stays small (:mod:`mmtrain.data.tar_shards`). The
    attribute is set by ``tarfile`` when it reads a header but is not in its documented
    attributes; the test reads an image back through it.
    """
    return member.offset_data


# --- datasets ---------------------------------------------------------------------------


@contextlib.contextmanager
def datasets_offline():
    """``datasets`` with the network off for a while: a Hub name resolves from the local cache or fails at once.

    ``--dataset_names`` takes a Hub name only as ``datasets`` cached it. ``load_dataset``
    asks the Hub first and falls back to the cache only when that fails; offline mode
    (``HF_HUB_OFFLINE``) is read into ``datasets.config.HF_HUB_OFFLINE`` when ``datasets``
    is imported, and the loader checks that attribute on each call. Setting it for the
    call keeps the run off the network without asking the user for the variable.
    """
    import datasets.config

    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was


# --- lazily resolved re-exports -------------------------------------------------------


def _repeat_kv():
    # transformers' helper that expands grouped key/value heads to the query heads
    # ([B, kv_heads, T, D] -> [B, kv_heads * n_rep, T, D], each head repeated n_rep times
    # in place). Internal to its SDPA integration; MMCA uses it so that its attention
    # treats grouped-query models exactly as transformers' own SDPA path does.
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv


def _create_causal_mask():
    # The mask builder every transformers decoder calls; internal, and its signature
    # changes between releases (input_embeds -> inputs_embeds, past_key_values -> cache),
    # which is why packing calls it with only the arguments its signature names. Packing
    # asks it whether restarts of position_ids become per-sample masks.
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask


def _estimate_zero2():
    # DeepSpeed's memory estimator, the form taking a parameter count instead of a model
    # (the documented ..._all_live variants need the model); returns (cpu_bytes, gpu_bytes).
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs


def _estimate_zero3():
    # As above for ZeRO-3, taking the largest layer's parameter count too; returns
    # (cpu_bytes, gpu_bytes, largest_layer_bytes).
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs


_LAZY = {
    "repeat_kv": _repeat_kv,
    "create_causal_mask": _create_causal_mask,
    "estimate_zero2_model_states_mem_needs": _estimate_zero2,
    "estimate_zero3_model_states_mem_needs": _estimate_zero3,
}


def __getattr__(name: str):
    loader = _LAZY.get(name)
    if loader is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = loader()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
