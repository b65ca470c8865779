"""The frozen base's matrix products in float8 (``--fp8_base``, ``--fp8_vision``).

A frozen Linear needs two products per step: ``y = x @ W.T`` in forward and
``grad_x = grad_y @ W`` in backward (no weight gradient: ``W`` does not train). Here
``W`` is held in float8 e4m3 with one scale per output channel, computed once when the
layer is converted, and each product runs on the float8 tensor cores
(:func:`float8_matmul`): the activations in forward and the output
gradients in backward are quantised on the fly, one scale per row (per token). The
layer holds one byte per weight instead of two; the bias, LoRA's low-rank term, the
projector and the new embedding rows stay in bfloat16.

Why not torchao: its float8 *training* (``convert_to_float8_training``) keeps the
high-precision weight as the parameter and casts it to float8 again at every step, so the
weight costs its two bytes plus a float8 copy, and the cast is paid each step although the
weight never changes. Its pre-quantised float8 weights
(``Float8DynamicActivationFloat8WeightConfig``) are for inference: ``_scaled_mm`` has no
derivative, so a backward through them fails. Neither holds a frozen weight in float8
once and back-propagates through it, which is what this module does, in one small
autograd function.

How backward reuses the forward's copy. ``grad_x = grad_y @ W`` reduces over the output
channels, the dimension the weight's scales run along, and row-wise ``_scaled_mm`` has no
scale on the reduction dimension. But ``grad_y @ diag(s) @ Wq`` is ``(grad_y * s) @ Wq``:
the per-output-channel scales are multiplied into the gradient as it is quantised
(fused with it under ``torch.compile``), and ``Wq`` needs no scale. So one float8 copy
with per-channel scales serves both products, without the precision loss of one scale
for the whole tensor.

The layout cost. cuBLASLt's float8 kernels take both operands with the reduction
dimension contiguous. ``Wq`` is stored ``[out, in]`` row-major, which is that layout for
forward (reduction over ``in``) but not for backward (reduction over ``out``), so
backward transposes it (``Wq.t().contiguous()``): a copy of one byte per weight, one
layer at a time, freed at once. The alternative, a second float8 copy kept transposed
from the start, saves that copy's time (a memory-bound pass, small next to the GEMM for
thousands of tokens per micro-batch) but costs a second byte per weight, i.e. the memory
bfloat16 took. We keep one byte; if a measurement shows the transpose mattering at small
batches, a kept transposed copy is the switch to add.

Exports are written from the original weights, not the float8 ones: with
``keep_original`` the layer keeps its weight as loaded (bfloat16 in GPU training) on the
CPU (host memory, two bytes per weight) and writes it as ``weight`` in its state dict,
so ``state_dict()`` and every export (LoRA merged into it) look exactly as without float8.
Re-reading the source folder instead would not cover presets, whose weights are drawn from
a seed on the device. Only the process that writes exports needs the originals (the
trainer keeps them on the main process); a layer without them writes its float8 weight
and ``weight_scale``, which are what it computes with.

Layers whose widths are not multiples of 16 (what the kernels need) stay bfloat16, and
:func:`convert_frozen_linears` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmtrain.compat import torch as torch_compat

# --- the float8 product ------------------------------------------------------------------
# Everything that depends on ``torch._scaled_mm``'s contract (reached through
# :func:`mmtrain.compat.torch.scaled_mm`) is in this block: the operand layout, the
# alignment, the scale shapes and the hardware that runs it.

FLOAT8 = torch.float8_e4m3fn  # 4 exponent bits, 3 mantissa bits: the format for weights and activations
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448: the largest finite value
# cuBLASLt's float8 kernels need the reduction and output widths to be multiples of 16.
FLOAT8_ALIGNMENT = 16
# float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FLOAT8_MIN_CAPABILITY = (8, 9)


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
    return torch_compat.scaled_mm(
        a.contiguous(), b.contiguous().t(), scale_a.reshape(-1, 1).float(), scale_b.reshape(1, -1).float(), out_dtype
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


# The smallest maximum a row is scaled by: an all-zero row (padding) must not divide by zero.
_MIN_AMAX = 1e-12


def quantize_rows(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., K] (times ``column_scale`` [K], if given) as float8 with one float32 scale per row: ``x ~= q * scale``.

    Each row's largest magnitude maps to float8's largest finite value, so no row
    overflows and each uses the format's whole range. Returns ``(q, scale)`` with
    ``scale`` shaped [..., 1]. Compiled with the decoder layers, these operations become
    inductor's kernels; a hand-written one-pass Triton kernel measured no faster on an
    H200 (benchmarks/README.md, "quantisation").
    """
    x = x.float() if column_scale is None else x.float() * column_scale.float()
    amax = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=_MIN_AMAX)
    scale = amax / FLOAT8_MAX
    q = (x / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
    return q, scale


def float8_linear_forward(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x2 @ W.T`` in bfloat16 for tokens ``x2`` [T, in] and the float8 ``weight`` [out, in] (scales [out])."""
    q, scale = quantize_rows(x2)
    return float8_matmul(q, weight, scale, weight_scale, torch.bfloat16)


def float8_linear_input_grad(grad_y: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``grad_y @ W`` in bfloat16 for ``grad_y`` [T, out]: the weight's scales go into the gradient (module docstring)."""
    q, scale = quantize_rows(grad_y, weight_scale)
    weight_t = weight.t().contiguous()  # [in, out]: the reduction dimension (out) contiguous, as the kernel needs
    ones = torch.ones(1, weight_t.shape[0], dtype=torch.float32, device=weight.device)
    return float8_matmul(q, weight_t, scale, ones, torch.bfloat16)


class _Float8FrozenLinearFunction(torch.autograd.Function):
    """``x @ W.T`` with the frozen float8 ``W``: forward and the input gradient in float8, no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale):
        x2 = x.reshape(-1, x.shape[-1])
        out = float8_linear_forward(x2, weight, weight_scale)
        ctx.save_for_backward(weight, weight_scale)  # not x: no weight gradient needs it
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = grad.reshape(-1, grad.shape[-1])
            grad_x = float8_linear_input_grad(g, weight, weight_scale).to(ctx.x_dtype).view(ctx.x_shape)
        return grad_x, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # what autocast would run the product in; without autocast, the input's own dtype
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class FrozenPackedLinear(nn.Module):
    """A frozen Linear whose weight is held packed (float8 codes, NF4 codes) beside its scales.

    Module-wide casts (``.to(dtype)``, ``.float()``, ``.bfloat16()``: DeepSpeed's engine, the
    trainer placing the frozen vision tower) would turn the codes and the scales into the
    cast's dtype. Here both only move to the device the cast names (the subclass moves its
    scales in :meth:`_move_scales`); the bias follows the cast like any frozen weight.
    """

    weight_format = "packed"

    def _move_scales(self, device: torch.device) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, device=self.weight.device)).device
        if device != self.weight.device:
            self.weight = nn.Parameter(self.weight.detach().to(device), requires_grad=False)
            self._move_scales(device)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.detach()), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.weight_format} weight"


class Float8FrozenLinear(FrozenPackedLinear):
    """A frozen ``nn.Linear`` whose weight is float8 with per-output-channel scales.

    ``weight`` is a frozen float8 parameter [out, in] (counted as a parameter, one byte
    each), ``weight_scale`` a float32 buffer [out]. DeepSpeed's mixed-precision cast
    leaves float8 parameters and float32 buffers alone (it casts fp16/bf16/fp32
    parameters only). ``original`` is the weight as loaded (its own dtype) on the CPU, or None.
    """

    weight_format = "float8"

    def __init__(self, linear: nn.Linear, *, keep_original: bool, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # Quantised on ``device`` when given (the GPU: seconds for 7B, where the CPU takes minutes).
        q, scale = quantize_rows(weight if device is None else weight.to(device))
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale.view(-1), persistent=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(q.device), requires_grad=False)
        # A plain attribute: .to(device) and the engine leave it on the CPU.
        self.original = weight.to("cpu", copy=True) if keep_original and weight.device.type != "meta" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out = _Float8FrozenLinearFunction.apply(x.to(dtype), self.weight, self.weight_scale)
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out

    def _move_scales(self, device: torch.device) -> None:
        self.weight_scale = self.weight_scale.to(device)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The original weight, so that exports and LoRA merges read what the model was.
        if self.original is not None:
            destination[prefix + "weight"] = self.original
        else:
            destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
            destination[prefix + "weight_scale"] = self.weight_scale
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Takes either form _save_to_state_dict writes: an original weight (quantised
        # here) or a float8 weight with its scales.
        key, scale_key = prefix + "weight", prefix + "weight_scale"
        if key in state_dict:
            value = state_dict[key]
            if tuple(value.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: {tuple(value.shape)} vs {(self.out_features, self.in_features)}")
            elif value.dtype == FLOAT8:
                if scale_key not in state_dict:
                    error_msgs.append(f"{key} is float8 but {scale_key} is missing")
                else:
                    with torch.no_grad():
                        self.weight.copy_(value)
                        self.weight_scale.copy_(state_dict[scale_key].view(-1))
            else:
                q, scale = quantize_rows(value.to(self.weight.device))
                with torch.no_grad():
                    self.weight.copy_(q)
                    self.weight_scale.copy_(scale.view(-1))
                if self.original is not None:
                    self.original.copy_(value)
        elif strict:
            missing_keys.append(key)
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            elif strict:
                missing_keys.append(bias_key)
        if strict:
            known = {key, scale_key, bias_key}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known and "." not in k[len(prefix):])


@dataclass
class Conversion:
    """What :func:`convert_frozen_linears` did: the names converted and those kept in bfloat16 (unaligned widths)."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def describe(self, what: str, first: int = 3) -> str:
        line = f"float8 {what}: {len(self.converted)} frozen Linear layers hold float8 weights"
        if self.kept:
            names = ", ".join(self.kept[:first]) + (", ..." if len(self.kept) > first else "")
            line += (
                f"; {len(self.kept)} stay bfloat16 because their widths are not multiples of "
                f"{FLOAT8_ALIGNMENT} ({names})"
            )
        return line


def _is_frozen_linear(module: nn.Module) -> bool:
    weight = module.weight
    return not weight.requires_grad and (module.bias is None or not module.bias.requires_grad)


def frozen_linears(root: nn.Module, scopes: list[nn.Module]):
    # (name relative to root, parent, attribute name, Linear) of each frozen plain nn.Linear in scopes
    inside = {id(m) for scope in scopes for m in scope.modules()}
    for parent_name, parent in list(root.named_modules()):
        if id(parent) not in inside:
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _is_frozen_linear(child):
                yield (f"{parent_name}.{child_name}" if parent_name else child_name), parent, child_name, child


def aligned(linear: nn.Linear) -> bool:
    """Whether the float8 kernels take this Linear's widths (both multiples of 16)."""
    return not (linear.in_features % FLOAT8_ALIGNMENT or linear.out_features % FLOAT8_ALIGNMENT)


def convertible_linears(root: nn.Module, scopes: list[nn.Module]) -> list[nn.Linear]:
    """The Linears :func:`convert_frozen_linears` would convert (what the memory model counts at one byte)."""
    return [linear for _, _, _, linear in frozen_linears(root, scopes) if aligned(linear)]


def convert_frozen_linears(
    root: nn.Module, scopes: list[nn.Module], *, keep_original: bool, device: torch.device | None = None
) -> Conversion:
    """Replace every frozen ``nn.Linear`` inside ``scopes`` (sub-modules of ``root``) by a :class:`Float8FrozenLinear`.

    Trainable Linears (LoRA's ``lora_A``/``lora_B``, layers that train whole) stay as
    they are; a LoRA layer's frozen ``base_layer`` is converted beneath its adapters.
    Names in the result are relative to ``root``. ``device``: where to quantise and keep
    the float8 weights (None: where each weight is). Idempotent.
    """
    result = Conversion()
    for name, parent, attribute, linear in frozen_linears(root, scopes):
        if not aligned(linear):
            result.kept.append(name)
            continue
        setattr(parent, attribute, Float8FrozenLinear(linear, keep_original=keep_original, device=device))
        result.converted.append(name)
    return result


def float8_base(module: nn.Module) -> Float8FrozenLinear | None:
    """``module`` if it is a float8 frozen Linear (what fused LoRA asks of its base layer), else None."""
    return module if isinstance(module, Float8FrozenLinear) else None
