"""The fused LoRA forward against peft's own: same outputs and gradients, and a safe fallback."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mmtrain.model import fused_lora
from mmtrain.model.decoder_layers import compile_decoder_layers
from mmtrain.model.fused_lora import fuse_lora_layers, unfuse_lora_layers
from tests.model.test_speed_features import _compile_works, assert_change_keeps_loss_and_grads


class _Block(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=bias)
        self.out = nn.Linear(40, 16, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def _adapted(bias=False, dropout=0.0, dtype=torch.float32, adapter_dtype=None, seed=0):
    torch.manual_seed(seed)
    block = _Block(bias)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["proj", "out"]), block)
    block.to(dtype)
    for name, param in block.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" in name:
            with torch.no_grad():
                param.copy_(0.3 * torch.randn(param.shape))
            if adapter_dtype is not None:
                param.data = param.data.to(adapter_dtype)
    return block


class _Calls:
    """Counts calls of the fused autograd function."""

    def __init__(self, monkeypatch):
        self.n = 0
        apply = fused_lora._LoraLinearFunction.apply

        def counted(*args):
            self.n += 1
            return apply(*args)

        monkeypatch.setattr(fused_lora._LoraLinearFunction, "apply", counted)


def _run(block, x, autocast=False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x)
    (y.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    for p in block.parameters():
        p.grad = None
    return y.detach(), x.grad, grads


def _error(got, exact):
    return (got.double() - exact).abs().max().item() / exact.abs().max().item()


@pytest.mark.parametrize(
    "dtype,bias,autocast",
    [(torch.float32, False, False), (torch.float32, True, False), (torch.bfloat16, True, False), (torch.float32, False, True)],
    ids=["fp32", "fp32-bias", "bf16", "autocast-bf16"],
)
def test_fused_equals_peft(monkeypatch, dtype, bias, autocast):
    """Outputs and every gradient: fp32 equal peft's; in bf16 at least as close to an fp64 run as peft's."""
    block = _adapted(bias=bias, dtype=dtype)
    x = torch.randn(3, 7, 24, dtype=dtype)
    exact = _run(_adapted(bias=bias, dtype=torch.float64), x.double())
    peft_run = _run(block, x, autocast)
    calls = _Calls(monkeypatch)
    assert fuse_lora_layers(block) == 2
    assert fuse_lora_layers(block) == 2  # idempotent: still one wrapper per layer
    fused_run = _run(block, x, autocast)
    assert calls.n == 2, "both layers must take the fused path"
    assert fused_run[0].dtype == peft_run[0].dtype and fused_run[2].keys() == peft_run[2].keys() and len(fused_run[2]) == 4
    for name in fused_run[2]:
        assert fused_run[2][name].dtype == peft_run[2][name].dtype, name  # fp32 adapters under autocast keep fp32 grads
    pairs = [("output", fused_run[0], peft_run[0], exact[0]), ("input grad", fused_run[1], peft_run[1], exact[1])]
    pairs += [(name, fused_run[2][name], peft_run[2][name], exact[2][name]) for name in fused_run[2]]
    low_precision = dtype == torch.bfloat16 or autocast
    for name, fused, peft, ref in pairs:
        if low_precision:
            assert _error(fused, ref) <= 1.5 * _error(peft, ref) + 2e-3, name
        else:
            # fp32: the same sums in another order (the low-rank term added inside the GEMM);
            # one rounding step of an output near zero is ~1e-6, a wrong term is O(1e-2)
            torch.testing.assert_close(fused, peft, rtol=1e-5, atol=3e-6, msg=name)
    assert unfuse_lora_layers(block) == 2
    _run(block, x, autocast)
    assert calls.n == 2, "unfused layers are peft's again"


class _AddsInPlace(_Block):
    """An MLP whose output is changed in place, as Falcon adds its attention output into its MLP's."""

    def forward(self, x):
        y = self.out(torch.relu(self.proj(x)))
        y += x[..., :16]
        return y


def test_fused_output_may_be_changed_in_place(monkeypatch):
    torch.manual_seed(0)
    block = _AddsInPlace(bias=True)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=12, target_modules=["proj", "out"]), block)
    for name, param in block.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_B" in name:
            with torch.no_grad():
                param.copy_(0.3 * torch.randn(param.shape))
    x = torch.randn(3, 7, 24)
    peft_run = _run(block, x)
    calls = _Calls(monkeypatch)
    fuse_lora_layers(block)
    fused_run = _run(block, x)
    assert calls.n == 2
    torch.testing.assert_close(fused_run[0], peft_run[0], rtol=1e-5, atol=3e-6)
    for name in peft_run[2]:
        torch.testing.assert_close(fused_run[2][name], peft_run[2][name], rtol=1e-5, atol=3e-6, msg=name)


def test_layers_it_does_not_cover_fall_back_to_peft(monkeypatch):
    calls = _Calls(monkeypatch)
    x = torch.randn(2, 5, 24)
    with_dropout = _adapted(dropout=0.1)
    fuse_lora_layers(with_dropout)
    with_dropout(x)
    mixed = _adapted(adapter_dtype=torch.float64)  # adapters in another dtype, no autocast
    y_ref = mixed(x)
    fuse_lora_layers(mixed)
    torch.testing.assert_close(mixed(x), y_ref)
    trained_base = _adapted()
    trained_base.proj.base_layer.weight.requires_grad_(True)
    fuse_lora_layers(trained_base)
    trained_base(x)
    assert calls.n == 1, "only trained_base.out is a plain adapter on a frozen base"
    disabled = _adapted()
    y_base = disabled.out.base_layer(torch.relu(disabled.proj.base_layer(x)))
    fuse_lora_layers(disabled)
    for layer in (disabled.proj, disabled.out):
        layer.enable_adapters(False)
    torch.testing.assert_close(disabled(x), y_base)
    assert calls.n == 1


def test_model_loss_and_grads_match_peft(tiny_args):
    def fuse(model):
        assert fuse_lora_layers(model) > 0

    assert_change_keeps_loss_and_grads(tiny_args, fuse, loss_tol=1e-6, grad_atol=1e-6, vis_lora_dim=4)


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_fused_lora_compiles(tiny_args):
    def fuse_and_compile(model):
        fuse_lora_layers(model)
        compile_decoder_layers(model.language_model)

    assert_change_keeps_loss_and_grads(tiny_args, fuse_and_compile)


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.float32),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    ],
)
def test_compiled_fused_lora_adds_the_low_rank_term_in_place(device, dtype):
    # Inductor turns an in-place addmm_ into an addmm into a new buffer, which first copies the
    # base output there; the fused layer's own op must keep both adds (forward, input
    # gradient) in place under torch.compile, with the same numbers as eager.
    block = _adapted(bias=False, dtype=dtype).to(device)  # a bias would make the base product an addmm of its own
    fuse_lora_layers(block)
    x = torch.randn(64, 24, device=device, dtype=dtype)
    y_eager, gx_eager, grads_eager = _run(block, x)
    block.compile(fullgraph=True)
    _run(block, x)  # compiles
    with torch.profiler.profile() as prof:
        y, gx, grads = _run(block, x)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("mmtrain::add_low_rank_") == 4  # two layers, forward and backward
    assert "aten::addmm" not in counts, sorted(counts)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, gx_eager)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
