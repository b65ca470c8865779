"""Float8 with outlier channels planted in a frozen layer's input, on the CPU (``tests/model/fp8_outliers.py``).

A 1024 -> 2752 layer (LLaMA-7B's MLP ratio at a quarter of its width, which the CPU's
float8 product computes in seconds); the GPU tier runs the 7B shapes themselves
(tests/gpu/test_fp8_outliers.py).
"""

from __future__ import annotations

import pytest
import torch

from mmtrain.model.fp8 import float8_row_wise_runs

from .fp8_outliers import frozen_linear, inlier_errors, layer_errors, lora_losses, outlier_activations

pytestmark = pytest.mark.skipif(
    not float8_row_wise_runs("cpu"), reason=f"torch {torch.__version__}'s CPU _scaled_mm takes no row-wise scales"
)


def test_outlier_channels_cost_float8_no_more_than_its_format():
    gen = torch.Generator().manual_seed(0)
    linear = frozen_linear(1024, 2752, gen)
    plain, _ = outlier_activations(128, 1024, 0, gen)
    spiky, picked = outlier_activations(128, 1024, 6, gen)
    grad_y = torch.randn(128, 2752, generator=gen)
    without, with_outliers = layer_errors(linear, plain, grad_y, "cpu"), layer_errors(linear, spiky, grad_y, "cpu")
    inliers = inlier_errors(spiky, picked)
    print(f"\nno outliers: {without}\n6 channels x100: {with_outliers}\nordinary channels rounded: {inliers}")
    fp8, bf16 = with_outliers["fp8"], with_outliers["bf16"]
    assert fp8["output"] > bf16["output"]  # float8 really ran: coarser than bfloat16
    assert fp8["output"] < 0.06 and fp8["input_grad"] < 0.06
    assert fp8["output"] < 1.5 * without["fp8"]["output"] and fp8["input_grad"] < 1.5 * without["fp8"]["input_grad"]
    # the ordinary channels, scaled by an outlier's row maximum, keep float8's few-percent precision
    assert inliers["fp8"] < 0.06, inliers
    assert inliers["fp8"] < 2 * inlier_errors(plain, [])["fp8"], inliers


def test_a_lora_adapter_over_outliers_trains_alike_on_float8_and_bf16():
    gen = torch.Generator().manual_seed(0)
    linear = frozen_linear(512, 1376, gen)
    x, _ = outlier_activations(64, 512, 4, gen)
    losses = lora_losses(linear, x, "cpu", steps=12, lr=1e-2)
    print({k: [round(v, 5) for v in run] for k, run in losses.items()})
    bf16, fp8 = losses["bf16"], losses["fp8"]
    assert bf16[-1] < 0.7 * bf16[0]  # the adapter learns
    differences = [abs(a - b) / b for a, b in zip(fp8, bf16)]
    assert max(differences) < 0.01, differences  # benchmarks/fp8_quality.py's target per step
