"""The one-pass Triton quantisation gives the torch operations' float8 values, eager and compiled.

Needs a CUDA GPU with float8 tensor cores and Triton (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import pytest
import torch

from mmtrain import compat
from mmtrain.model import fp8, fp8_triton
from mmtrain.model.fp8 import Float8FrozenLinear, quantize_rows_torch

pytestmark = pytest.mark.skipif(
    not (fp8_triton.available() and torch.cuda.is_available() and compat.float8_matmul_problem("cuda") is None),
    reason="needs Triton and a CUDA GPU with float8 tensor cores",
)


def _same(got, expected):
    (q, scale), (q_ref, scale_ref) = got, expected
    assert q.dtype == compat.FLOAT8 and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref)
    # float8 has no comparison kernels on CUDA: compare the bytes.
    mismatched = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
    assert mismatched == 0, f"{mismatched} of {q.numel()} float8 values differ"


@pytest.mark.parametrize("width", [64, 4096, 11008, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_column_scale", [False, True])
def test_kernel_gives_the_torch_values(width, dtype, with_column_scale):
    g = torch.Generator(device="cuda").manual_seed(width)
    x = (torch.randn(97, width, device="cuda", generator=g) * torch.logspace(-3, 3, 97, device="cuda")[:, None]).to(dtype)
    x[5] = 0  # a padding row: scaled by the smallest maximum, all zeros
    x[7, 3] = 1e4  # one outlier: the rest of its row is scaled down with it
    column_scale = torch.rand(width, device="cuda", generator=g) + 0.01 if with_column_scale else None
    _same(fp8_triton.quantize_rows(x, column_scale), quantize_rows_torch(x, column_scale))
    assert torch.equal(fp8_triton.quantize_rows(x, column_scale)[0][5].view(torch.uint8), torch.zeros(width, dtype=torch.uint8, device="cuda"))


def test_rows_with_a_stride_and_leading_dimensions():
    x = torch.randn(4, 6, 256, device="cuda", dtype=torch.bfloat16)
    q, scale = fp8.quantize_rows(x[:, :, :128])  # rows 256 apart, 128 wide
    assert q.shape == (4, 6, 128) and scale.shape == (4, 6, 1)
    _same((q, scale), quantize_rows_torch(x[:, :, :128]))


def test_switch_keeps_the_torch_path(monkeypatch):
    x = torch.randn(8, 64, device="cuda")
    calls = []
    monkeypatch.setattr(fp8_triton, "quantize_rows", lambda *a: calls.append(a) or quantize_rows_torch(*a))
    monkeypatch.setattr(fp8, "TRITON_QUANTIZE", False)
    fp8.quantize_rows(x)
    assert not calls
    monkeypatch.setattr(fp8, "TRITON_QUANTIZE", True)
    fp8.quantize_rows(x)
    assert len(calls) == 1


def test_layer_forward_and_input_gradient_match_the_torch_path_eager_and_compiled(monkeypatch):
    torch.manual_seed(0)
    layer = Float8FrozenLinear(torch.nn.Linear(512, 1024, bias=False).requires_grad_(False), keep_original=False, device=torch.device("cuda"))
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)

    def run(triton: bool, compiled: bool):
        monkeypatch.setattr(fp8, "TRITON_QUANTIZE", triton)
        torch._dynamo.reset()
        fn = torch.compile(layer, dynamic=True) if compiled else layer
        xi = x.clone().requires_grad_(True)
        out = fn(xi)
        out.backward(grad)
        return out, xi.grad

    kernel, torch_ops = run(True, False), run(False, False)
    # The same float8 operands into the same GEMMs: equal results.
    assert all(torch.equal(a, b) for a, b in zip(kernel, torch_ops))
    # Inside a compiled layer (as the decoder layers are) the kernel runs as it does eagerly.
    assert all(torch.equal(a, b) for a, b in zip(run(True, True), kernel))
