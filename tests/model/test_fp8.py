"""Float8 frozen Linears: their error against fp64 beside bfloat16's, what is converted, what trains, and exports.

torch's CPU ``_scaled_mm`` takes float8 operands (tests/test_compat.py checks it), so the
numbers are checked here on any machine; a capable GPU runs the same tests on CUDA too.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mmtrain.model import fused_lora
from mmtrain.model.builder import build_model
from mmtrain.model.config import SpeedOptions
from mmtrain.model.fp8 import FLOAT8, FLOAT8_MAX, float8_matmul_problem, float8_row_wise_runs, Float8FrozenLinear, convert_frozen_linears, quantize_rows
from mmtrain.model.fused_lora import fuse_lora_layers


# The tests below that compute on a CPU need its row-wise float8 product (torch >= 2.13).
cpu_float8 = pytest.mark.skipif(
    not float8_row_wise_runs("cpu"), reason=f"torch {torch.__version__}'s CPU _scaled_mm takes no row-wise scales"
)


def _devices() -> list[str]:
    devices = ["cpu"] if float8_row_wise_runs("cpu") else []
    if torch.cuda.is_available() and float8_matmul_problem("cuda") is None:
        devices.append("cuda")
    return devices


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("device", _devices())
def test_one_layer_error_against_fp64_beside_bf16(device):
    """Forward output and input gradient of one layer: float8's relative error is bounded, and printed beside bfloat16's."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 128, generator=gen) / 128**0.5)
        linear.bias.copy_(torch.randn(96, generator=gen) * 0.1)
    x = torch.randn(2, 33, 128, generator=gen)  # 66 tokens: M need not be aligned
    x[0, 3] *= 40  # one outlier token: row-wise scales keep it from costing the others their precision
    grad_y = torch.randn(2, 33, 96, generator=gen)

    exact_w, exact_b = linear.weight.double(), linear.bias.double()
    exact_y = x.double() @ exact_w.t() + exact_b
    exact_gx = grad_y.double() @ exact_w

    def run(layer, dtype):
        xi = x.to(device, dtype).requires_grad_(True)
        y = layer(xi)
        y.backward(grad_y.to(device, dtype))
        return y.detach().cpu(), xi.grad.cpu()

    bf16 = nn.Linear(128, 96).to(device, torch.bfloat16).requires_grad_(False)
    bf16.load_state_dict(linear.state_dict())
    fp8 = Float8FrozenLinear(linear.to(torch.bfloat16), keep_original=False, device=torch.device(device))
    assert fp8.weight.dtype == FLOAT8 and fp8.weight_scale.dtype == torch.float32

    errors = {}
    for name, layer in (("bf16", bf16), ("fp8", fp8)):
        y, gx = run(layer, torch.bfloat16)
        assert y.dtype == gx.dtype == torch.bfloat16
        errors[name] = (_relative_error(y, exact_y), _relative_error(gx, exact_gx))
    print(f"relative error vs fp64 on {device} (forward, input gradient): bf16 {errors['bf16']}, fp8 {errors['fp8']}")
    fwd, bwd = errors["fp8"]
    assert fwd < 0.06 and bwd < 0.06, errors
    assert fwd > errors["bf16"][0]  # a test that float8 really ran: it is coarser than bfloat16
    assert not fp8.weight.requires_grad and fp8.weight.grad is None


@cpu_float8
def test_weight_scales_are_per_output_channel():
    w = torch.tensor([[1.0, -2.0], [0.001, 0.0005]])
    q, scale = quantize_rows(w)
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale.view(-1), torch.tensor([2.0, 0.001]) / FLOAT8_MAX)
    torch.testing.assert_close(q.float() * scale, w, rtol=0.07, atol=0)
    assert quantize_rows(torch.zeros(1, 16))[0].float().abs().sum() == 0  # an all-zero row stays zero, no NaN


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 48, bias=False)
        self.down = nn.Linear(48, 32, bias=True)
        self.odd = nn.Linear(32, 40, bias=False)  # 40 outputs: not a multiple of 16

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.odd(x)[..., :32]


def _lora_block(seed=0):
    torch.manual_seed(seed)
    block = _Block()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["up", "odd", "down"]), block)
    for name, param in block.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_B" in name:
            with torch.no_grad():
                param.copy_(0.1 * torch.randn(param.shape))
    return block.to(torch.bfloat16)


@cpu_float8
def test_conversion_keeps_unaligned_layers_and_names_them():
    block = _lora_block()
    result = convert_frozen_linears(block, [block], keep_original=True)
    assert result.converted == ["up.base_layer", "down.base_layer"]
    assert result.kept == ["odd.base_layer"]
    assert "2 frozen Linear layers hold float8" in result.describe("base") and "1 stay bfloat16" in result.describe("base")
    assert "odd.base_layer" in result.describe("base")
    assert isinstance(block.up.base_layer, Float8FrozenLinear) and type(block.odd.base_layer) is nn.Linear
    for name, module in block.named_modules():
        if ".lora_" in name and isinstance(module, nn.Linear):
            assert module.weight.dtype == torch.bfloat16  # adapters are never converted
    assert convert_frozen_linears(block, [block], keep_original=True).converted == []  # idempotent


@cpu_float8
def test_frozen_weights_get_no_gradient_and_lora_trains():
    """Peft's forward and fused LoRA over float8 bases: no base weight gradient, and LoRA's gradients
    agree with each other and with fp64 within 16x bfloat16's error (e4m3 keeps 3 mantissa bits, bf16 7)."""
    x = torch.randn(64, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for kind in ("fp64", "bf16", "fp8", "fp8-fused"):
        block = _lora_block()
        if kind == "fp64":
            block.double()
        if kind.startswith("fp8"):
            convert_frozen_linears(block, [block], keep_original=False)
        if kind.endswith("fused"):
            assert fuse_lora_layers(block) == 3
        xi = x.clone().to(torch.float64 if kind == "fp64" else torch.bfloat16).requires_grad_(True)
        block(xi).float().pow(2).mean().backward()
        grads[kind] = {n: p.grad.double() for n, p in block.named_parameters() if p.grad is not None}
        assert all(".lora_" in n for n in grads[kind])
        assert not any(p.grad is not None for n, p in block.named_parameters() if ".lora_" not in n)
        assert xi.grad is not None
    exact = grads.pop("fp64")
    assert all(g.keys() == exact.keys() for g in grads.values()) and len(exact) == 6
    for name, want in exact.items():
        errors = {kind: _relative_error(g[name], want) for kind, g in grads.items()}
        print(name, errors)
        assert errors["fp8"] < 16 * errors["bf16"] and errors["fp8-fused"] < 16 * errors["bf16"], (name, errors)
        assert _relative_error(grads["fp8-fused"][name], grads["fp8"][name]) < 0.05, name  # same products, bf16 roundings apart


@cpu_float8
def test_under_autocast_float8_layers_take_the_autocast_dtype():
    """Plain mixed precision: fp32 adapters, bf16 frozen weights, autocast; fused and peft's forward agree."""
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    runs = {}
    for fused in (False, True):
        block = _lora_block()
        for name, param in block.named_parameters():
            if ".lora_" in name:
                param.data = param.data.float()
        convert_frozen_linears(block, [block], keep_original=False)
        if fused:
            fuse_lora_layers(block)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xi)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).mean().backward()
        grad = block.up.lora_A["default"].weight.grad
        assert grad.dtype == torch.float32
        runs[fused] = (y.detach().double(), grad.double())
    assert _relative_error(runs[True][0], runs[False][0]) < 0.02
    assert _relative_error(runs[True][1], runs[False][1]) < 0.05


def _compile_problem() -> str | None:
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as err:  # no C++ compiler here
        return f"torch.compile does not run here: {type(err).__name__}: {err}"
    return None


@pytest.mark.skipif(_compile_problem() is not None, reason=str(_compile_problem()))
@cpu_float8
def test_compiled_float8_block_gives_the_eager_numbers():
    """Regional compilation compiles the decoder layers around these layers: same outputs and LoRA gradients."""
    x = torch.randn(16, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        block = _lora_block()
        convert_frozen_linears(block, [block], keep_original=False)
        fuse_lora_layers(block)
        if compiled:
            block.compile()
        y = block(x.clone().requires_grad_(True))
        y.float().pow(2).mean().backward()
        runs.append((y.detach().double(), block.down.lora_B["default"].weight.grad.double()))
    assert _relative_error(runs[1][0], runs[0][0]) < 0.02
    assert _relative_error(runs[1][1], runs[0][1]) < 0.05


@cpu_float8
def test_fused_lora_runs_the_float8_base_product(monkeypatch):
    block = _lora_block()
    convert_frozen_linears(block, [block], keep_original=False)
    fuse_lora_layers(block)
    seen = []
    forward = fused_lora.float8_linear_forward
    monkeypatch.setattr(fused_lora, "float8_linear_forward", lambda *a: seen.append(1) or forward(*a))
    block(torch.randn(3, 32, dtype=torch.bfloat16))
    assert len(seen) == 2  # up and down; odd stayed bfloat16


@cpu_float8
def test_module_casts_move_the_float8_weights_but_keep_their_dtypes():
    """``.to(dtype)`` on a whole model (the trainer places the frozen vision tower so) must not cast float8 or its scales."""
    block = _lora_block()
    convert_frozen_linears(block, [block], keep_original=False)
    layer = block.down.base_layer
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    block.to(torch.float32)
    assert layer.weight.dtype == FLOAT8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight.float(), weight.float()) and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.float32 and block.down.lora_A["default"].weight.dtype == torch.float32
    block.to("meta")
    assert layer.weight.device.type == "meta" and layer.weight_scale.device.type == "meta"


@cpu_float8
def test_state_dict_holds_the_original_weights():
    block = _lora_block()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    convert_frozen_linears(block, [block], keep_original=True)
    after = block.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # bit for bit: the originals, not the float8 copy
    # Without originals the state dict says what the layer computes with, and loads back.
    other = _lora_block(seed=1)
    convert_frozen_linears(other, [other], keep_original=False)
    state = other.state_dict()
    assert state["up.base_layer.weight"].dtype == FLOAT8 and "up.base_layer.weight_scale" in state
    block.load_state_dict(state)
    torch.testing.assert_close(block.up.base_layer.weight.float(), other.up.base_layer.weight.float(), rtol=0, atol=0)


@cpu_float8
def test_builder_converts_the_lm_decoder_layers_only(tiny_args, caplog):
    """Decoder layers' frozen Linears become float8; lm_head, embeddings, projector, LoRA stay; the export equals bf16's."""
    config = tiny_args(lang_lora_dim=4)
    torch.manual_seed(0)  # the projector's and adapters' random start
    plain = build_model(config, dtype=torch.bfloat16, trainable_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="mmtrain"):
        built = build_model(
            config, dtype=torch.bfloat16, trainable_dtype=torch.bfloat16, speed=SpeedOptions(fp8_base=True, fused_lora=True)
        )
    lm = built.model.language_model
    fp8 = [n for n, m in lm.named_modules() if isinstance(m, Float8FrozenLinear)]
    layers = lm.config.num_hidden_layers
    assert len(fp8) == 7 * layers and all(".layers." in n and n.endswith(".base_layer") for n in fp8)
    assert lm.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype != FLOAT8 for n, p in built.model.named_parameters() if not n.startswith("language_model.") or p.requires_grad)
    assert f"{7 * layers} frozen Linear layers hold float8 weights" in caplog.text
    # Same names and values as without float8: exports and LoRA merges read these.
    want, got = plain.model.state_dict(), built.model.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    # and the model runs, LoRA training
    ids = torch.randint(0, 100, (2, 12))
    out = lm(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in lm.parameters())
