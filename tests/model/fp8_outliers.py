"""Float8 against bfloat16 where real LLMs are hard: activations with a few channels ~100x the rest.

Trained LLMs carry a handful of hidden channels whose activations are about a hundred times
the others in every token (the "emergent outliers" of LLM.int8()); random weights, as in
``benchmarks/fp8_quality.py``, have none. Here they are planted in the input of one frozen
Linear of a real model's shape, and float8's row-wise quantisation (one scale per token,
so an outlier sets the scale of its whole row) is measured against float64, beside
bfloat16: the ordinary channels' entries once rounded, the forward output, the input
gradient, and the loss of a LoRA adapter trained on that layer for a few steps. The CPU tests (tests/model/test_fp8_outliers.py) and the
GPU tier (tests/gpu/test_fp8_outliers.py, the 7B shapes) share these functions.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtrain.model.fp8 import Float8FrozenLinear, quantize_rows

OUTLIER_FACTOR = 100.0


def outlier_activations(tokens: int, width: int, channels: int, gen: torch.Generator, factor: float = OUTLIER_FACTOR) -> tuple[torch.Tensor, list[int]]:
    """``[tokens, width]`` standard normal activations whose ``channels`` fixed columns are ``factor`` times larger."""
    x = torch.randn(tokens, width, generator=gen)
    picked = torch.randperm(width, generator=gen)[:channels].tolist()
    x[:, picked] *= factor
    return x, picked


def frozen_linear(width_in: int, width_out: int, gen: torch.Generator) -> nn.Linear:
    """A frozen Linear whose weights are bfloat16 values (what both formats start from), held in float32."""
    linear = nn.Linear(width_in, width_out, bias=False).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_((torch.randn(width_out, width_in, generator=gen) / width_in**0.5).to(torch.bfloat16).float())
    return linear


def _bf16_copy(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=False).requires_grad_(False)
    copy.weight.copy_(linear.weight)
    return copy.to(torch.bfloat16)


def _relative(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


def layer_errors(linear: nn.Linear, x: torch.Tensor, grad_y: torch.Tensor, device: str) -> dict[str, dict[str, float]]:
    """Relative errors against float64 of the output and the input gradient, for bfloat16 and float8."""
    w = linear.weight.double()
    exact_y, exact_gx = x.double() @ w.t(), grad_y.double() @ w
    layers = {
        "bf16": nn.Linear(linear.in_features, linear.out_features, bias=False).to(device, torch.bfloat16).requires_grad_(False),
        "fp8": Float8FrozenLinear(_bf16_copy(linear), keep_original=False, device=torch.device(device)),
    }
    layers["bf16"].weight.copy_(linear.weight)
    errors = {}
    for name, layer in layers.items():
        xi = x.to(device, torch.bfloat16).requires_grad_(True)
        y = layer(xi)
        y.backward(grad_y.to(device, torch.bfloat16))
        errors[name] = {"output": _relative(y.detach().cpu(), exact_y), "input_grad": _relative(xi.grad.cpu(), exact_gx)}
    return errors


def inlier_errors(x: torch.Tensor, outliers: list[int]) -> dict[str, float]:
    """How well each format holds the ordinary channels: relative error of their entries once rounded.

    float8's scale is one per token, set by the token's largest entry, an outlier here:
    the ordinary entries then sit about a hundred times below the top of the format's range.
    """
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[outliers] = False
    q, scale = quantize_rows(x.to(torch.bfloat16))
    rounded = {"bf16": x.to(torch.bfloat16), "fp8": q.float() * scale}
    return {name: _relative(r[:, keep], x.double()[:, keep]) for name, r in rounded.items()}


def lora_losses(linear: nn.Linear, x: torch.Tensor, device: str, steps: int, rank: int = 16, lr: float = 1e-3) -> dict[str, list[float]]:
    """Per-step MSE of a LoRA adapter on the frozen layer learning a fixed low-rank change, bfloat16 base vs float8 base.

    Both start from the same adapter and see the same inputs (with their outliers); the
    target is the layer plus a rank-``rank`` change, computed in float64, so each loss
    falls only as far as the base's products let the adapter see the change.
    """
    gen = torch.Generator().manual_seed(1)
    d_in, d_out = linear.in_features, linear.out_features
    delta = (torch.randn(d_out, rank, generator=gen) @ torch.randn(rank, d_in, generator=gen)) / (rank * d_in) ** 0.5
    target = (x.double() @ (linear.weight.double() + delta.double()).t()).to(device, torch.bfloat16)
    scale = target.float().pow(2).mean()
    a0 = torch.randn(rank, d_in, generator=gen) / d_in**0.5
    bases = {
        "bf16": nn.Linear(d_in, d_out, bias=False).to(device, torch.bfloat16).requires_grad_(False),
        "fp8": Float8FrozenLinear(_bf16_copy(linear), keep_original=False, device=torch.device(device)),
    }
    bases["bf16"].weight.copy_(linear.weight)
    xs = x.to(device, torch.bfloat16)
    losses = {}
    for name, base in bases.items():
        a = nn.Parameter(a0.clone().to(device))
        b = nn.Parameter(torch.zeros(d_out, rank, device=device))
        optimizer = torch.optim.AdamW([a, b], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        run = []
        for _ in range(steps):
            y = base(xs) + (xs.float() @ a.t() @ b.t()).to(torch.bfloat16)
            loss = (y.float() - target.float()).pow(2).mean() / scale
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses[name] = run
    return losses
