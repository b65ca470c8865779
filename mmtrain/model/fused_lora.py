"""LoRA's extra work folded into the base layer's matrix products (``--fused_lora``).

peft computes an adapted Linear as ``base(x) + lora_B(lora_A(x)) * scale``: besides the
two small rank-r products, that is one multiply and one add over the whole output in
forward, and again a multiply and an add (the two paths' input gradients) in backward,
each a separate pass over a ``[tokens, features]`` activation. With the base frozen and
~224 adapted layers in a 7B model, those passes cost about as much time as the
attention (see benchmarks/README.md).

Here the same function is one autograd node whose adds happen inside the matrix
products: the GEMM epilogue ``C = alpha * A @ B + beta * C`` (``addmm_``) adds the
scaled low-rank term onto the base output, and in backward adds the low-rank input
gradient onto the base one. The scale is applied to the rank-r intermediates, which are
tiny. Numbers equal peft's up to rounding (one rounding instead of three).

We keep peft for everything else (injection, naming, saving, merging): only the forward
of plain adapters is replaced, per layer, and any layer state this does not cover
(dropout, DoRA and other variants, several or disabled adapters, merged weights, a
trainable base, ZeRO-3 partitioned weights that are not gathered at this point, mixed dtypes
outside autocast) falls back to peft's own forward, so the switch is always safe to leave on.
At ZeRO-3 the trainer marks each LM decoder layer as a leaf module, so the whole layer's
weights are gathered on entry and the fused forward applies there too.

With a float8 base (``--fp8_base``, :mod:`mmtrain.model.fp8`) the base product in both
directions is the float8 one and the low-rank term stays in the compute dtype; the
low-rank term is still added onto the base output (and input gradient) in place.

In place under ``torch.compile`` too. Inductor turns ``out.addmm_(...)`` into
``addmm(out, ...)`` written to a new buffer, and ATen's ``addmm`` into another buffer
first copies ``out`` there: a full extra pass over a ``[tokens, features]`` activation
per adapted layer and direction (on ref-7b with a float8 base, ~1,360 device-to-device
copies and ~6% of a step on an H200). :func:`add_low_rank_` is one opaque op that mutates
its first argument; inductor keeps such a mutation in place when, as here, nothing else
reads the base output, so cuBLAS adds onto it directly (``beta = 1``).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.compat import peft as peft_compat
from mmtrain.model.fp8 import float8_base, float8_linear_forward, float8_linear_input_grad


@torch.library.custom_op("mmtrain::add_low_rank_", mutates_args=("out",))
def _add_low_rank_op(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float) -> None:
    out.addmm_(left, right, alpha=alpha)


def add_low_rank_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out += alpha * left @ right`` in place, also inside a compiled graph (module docstring); returns ``out``."""
    if torch.compiler.is_compiling():
        _add_low_rank_op(out, left, right, float(alpha))
    else:  # eager: addmm_ is in place already, without the custom op's dispatch
        out.addmm_(left, right, alpha=alpha)
    return out


class _LoraLinearFunction(torch.autograd.Function):
    """``x @ W.T + b + scale * (x @ A.T) @ B.T`` with the frozen ``W``, ``b`` and trainable ``A``, ``B``.

    ``weight_scale`` None: ``W`` is a plain weight. Otherwise ``W`` is float8 with these
    per-output-channel scales and both base products run in float8.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, lora_a, lora_b, scale: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()  # [tokens, r]
        if weight_scale is None:
            out = F.linear(x2, weight, bias)
        else:
            out = float8_linear_forward(x2, weight, weight_scale).to(x.dtype)
            if bias is not None:
                out += bias
        add_low_rank_(out, xa, lora_b.t(), scale)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[4] else None, xa, weight, weight_scale, lora_a, lora_b)
        ctx.scale = scale
        ctx.x_shape = x.shape
        if weight_scale is not None:
            # The float8 path returns its view from here, as the GPU tier has verified it
            # (compiled, with token budgets); the plain path shapes it outside.
            return out.view(*x.shape[:-1], out.shape[-1])
        # [tokens, out]: shaped like x outside (_lora_linear), where the view is autograd's own, so
        # that an LM may change the output in place (Falcon adds its attention into the MLP's)
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, weight_scale, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = (g @ lora_b).mul_(ctx.scale)  # [tokens, r], the scale folded in here
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight if weight_scale is None else float8_linear_input_grad(g, weight, weight_scale).to(g.dtype)
            add_low_rank_(grad_x, gb, lora_a)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_a = gb.t() @ x2
        if ctx.needs_input_grad[5]:
            grad_b = g.t() @ (xa * ctx.scale)
        return grad_x, None, None, None, grad_a, grad_b, None


def _lora_linear(x, weight, weight_scale, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    out = _LoraLinearFunction.apply(x, weight, weight_scale, bias, lora_a, lora_b, scale)
    return out if out.dim() == x.dim() else out.view(*x.shape[:-1], out.shape[-1])


def _fusable(layer: nn.Module, x: torch.Tensor, adapter: str) -> bool:
    if not peft_compat.lora_runs_one_plain_adapter(layer, adapter):
        return False
    base, lora_a, lora_b, _ = peft_compat.lora_parts(layer, adapter)
    if lora_a.bias is not None or lora_b.bias is not None:
        return False
    fp8 = float8_base(base)  # frozen by construction and never partitioned (refused at ZeRO-3)
    if fp8 is None:
        if not isinstance(base, nn.Linear):
            return False
        weight = base.weight
        if weight.requires_grad or (base.bias is not None and base.bias.requires_grad) or not deepspeed_compat.zero3_gathered(weight):
            return False  # a trained base, or a ZeRO-3 weight not gathered here (hooks gather it around base_layer's forward)
    if torch.is_autocast_enabled(x.device.type):
        return True
    # A float8 weight is never in the input's dtype: the float8 product takes it as it is.
    return x.dtype == lora_a.weight.dtype == lora_b.weight.dtype and (fp8 is not None or base.weight.dtype == x.dtype)


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = self._mmtrain_adapter
    if args or kwargs or not _fusable(self, x, adapter):
        return self._mmtrain_peft_forward(x, *args, **kwargs)
    base, lora_a, lora_b, scale = peft_compat.lora_parts(self, adapter)
    fp8 = float8_base(base)
    weight, weight_scale = (base.weight, None) if fp8 is None else (fp8.weight, fp8.weight_scale)
    bias, a, b = base.bias, lora_a.weight, lora_b.weight
    if torch.is_autocast_enabled(x.device.type):
        # What autocast would do to each product, done once up front; casting back the
        # adapters' gradients to their own dtype is autograd's job. A float8 weight and its
        # scales are never cast.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, bias, a, b = (t if t is None else t.to(dtype) for t in (x, bias, a, b))
        if fp8 is None:
            weight = weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _lora_linear(x, weight, weight_scale, bias, a, b, scale)
    if fp8 is not None and bias is not None:
        bias = bias.to(x.dtype)  # the float8 product comes out in the input's dtype
    return _lora_linear(x, weight, weight_scale, bias, a, b, scale)


def fuse_lora_layers(module: nn.Module, adapter: str = "default") -> int:
    """Give every peft LoRA ``Linear`` inside ``module`` the fused forward; returns how many (idempotent)."""
    count = 0
    for sub in module.modules():
        if peft_compat.is_lora_linear(sub, adapter):
            if not hasattr(sub, "_mmtrain_peft_forward"):
                sub._mmtrain_peft_forward = sub.forward
                sub._mmtrain_adapter = adapter
                sub.forward = types.MethodType(_fused_forward, sub)
            count += 1
    return count


def unfuse_lora_layers(module: nn.Module) -> int:
    """Restore peft's own forward everywhere; returns how many layers changed."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "_mmtrain_peft_forward"):
            sub.forward = sub._mmtrain_peft_forward
            del sub._mmtrain_peft_forward, sub._mmtrain_adapter
            count += 1
    return count
