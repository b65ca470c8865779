"""NF4 frozen Linears (``--quantize_base nf4``): what they compute, what they save, what converts, and the merged export.

bitsandbytes' CPU backend quantises and multiplies NF4 weights, so these run on any
machine that has it installed (``pip install 'mmtrain[qlora]'``); without it they skip.
The GPU tier (tests/gpu/test_tier.py) trains through the same layers on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from mmtrain.model import fused_lora  # noqa: E402
from mmtrain.model.builder import build_model  # noqa: E402
from mmtrain.model.config import SpeedOptions  # noqa: E402
from mmtrain.model.counting import count_parameters  # noqa: E402
from mmtrain.model.lora import lora_scalings, merge_lora_state_dict  # noqa: E402
from mmtrain.model.nf4 import BITS_PER_WEIGHT, NF4FrozenLinear, codes_in_state_dict, nf4_problem, quantize_frozen_linears  # noqa: E402


def _linear(gen: torch.Generator, width_in: int = 128, width_out: int = 96, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(width_in, width_out, bias=bias).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(width_out, width_in, generator=gen) / width_in**0.5)
        if bias:
            linear.bias.copy_(torch.randn(width_out, generator=gen) * 0.1)
    return linear


def test_the_layer_computes_with_its_dequantised_weight_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    linear = _linear(gen)
    layer = NF4FrozenLinear(linear)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 96 * 128 // 2 and not layer.weight.requires_grad
    x = torch.randn(2, 5, 128, generator=gen, requires_grad=True)
    grad_y = torch.randn(2, 5, 96, generator=gen)
    y = layer(x)
    y.backward(grad_y)
    w = layer.dequantized()
    assert torch.allclose(y, x.detach() @ w.t() + linear.bias, atol=1e-5)
    assert torch.allclose(x.grad, grad_y @ w, atol=1e-5)
    # 16 levels per block of 64: the weight is within NF4's error of the original, not equal to it
    error = ((w - linear.weight).norm() / linear.weight.norm()).item()
    assert 0.01 < error < 0.15, error


def test_casts_move_the_codes_and_leave_them_codes():
    layer = NF4FrozenLinear(_linear(torch.Generator().manual_seed(1)))
    before = layer.dequantized().clone()
    layer.bfloat16()  # what DeepSpeed's engine does to its module with bf16 on
    layer.to(dtype=torch.float16)
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float16
    assert torch.equal(layer.dequantized(), before)


def test_state_dict_holds_the_dequantised_weight_and_a_round_trip_keeps_the_codes():
    gen = torch.Generator().manual_seed(2)
    layer = NF4FrozenLinear(_linear(gen))
    codes = layer.weight.clone()
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"} and state["weight"].dtype == torch.float32
    assert torch.equal(state["weight"], layer.dequantized())
    layer.load_state_dict(state)
    assert torch.equal(layer.weight, codes)  # its own weight back: nothing re-quantised
    other = _linear(gen)
    layer.load_state_dict(other.state_dict())  # another full-precision weight: quantised on load
    assert not torch.equal(layer.weight, codes)
    assert ((layer.dequantized() - other.weight).norm() / other.weight.norm()).item() < 0.15


def test_a_checkpoint_takes_the_codes_without_dequantising_and_they_do_not_load_as_weights():
    layer = NF4FrozenLinear(_linear(torch.Generator().manual_seed(6)))
    with codes_in_state_dict():
        state = layer.state_dict()
    assert state["weight"].dtype == torch.uint8 and state["weight"].data_ptr() == layer.weight.data_ptr()  # no copy
    assert layer.state_dict()["weight"].dtype == torch.float32  # outside it: the dequantised weight again
    with pytest.raises(RuntimeError, match="4-bit codes without their block scales"):
        layer.load_state_dict(state)


def test_only_frozen_linears_convert_and_lora_stays_trainable_over_the_codes():
    from peft import LoraConfig, inject_adapter_in_model

    gen = torch.Generator().manual_seed(3)
    block = nn.Sequential(_linear(gen, 64, 64), nn.ReLU(), _linear(gen, 64, 32))
    block = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), block)
    for name, p in block.named_parameters():
        p.requires_grad_(".lora_" in name)
    result = quantize_frozen_linears(block, [block])
    assert sorted(result.converted) == ["0.base_layer", "2"]
    assert isinstance(block[0].base_layer, NF4FrozenLinear) and isinstance(block[2], NF4FrozenLinear)
    assert quantize_frozen_linears(block, [block]).converted == []  # idempotent
    x = torch.randn(3, 64, generator=gen)
    block(x).sum().backward()
    assert block[0].lora_A["default"].weight.grad is not None


def test_fused_lora_leaves_nf4_layers_to_peft_with_the_same_numbers():
    from peft import LoraConfig, inject_adapter_in_model

    gen = torch.Generator().manual_seed(4)
    block = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), nn.Sequential(_linear(gen, 64, 48)))
    with torch.no_grad():
        block[0].lora_B["default"].weight.normal_(0, 0.1, generator=gen)
    quantize_frozen_linears(block, [block])
    x = torch.randn(5, 64, generator=gen)
    plain = block(x)
    assert fused_lora.fuse_lora_layers(block) == 1
    assert torch.equal(block(x), plain)


def test_merged_export_is_the_dequantised_weight_plus_the_lora_delta():
    """The export's weight reproduces the 4-bit model's function: dequant(W) + scale * B @ A, one rounding."""
    from peft import LoraConfig, inject_adapter_in_model

    gen = torch.Generator().manual_seed(5)
    block = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), nn.Sequential(_linear(gen, 64, 48)))
    with torch.no_grad():
        block[0].lora_B["default"].weight.normal_(0, 0.1, generator=gen)
    quantize_frozen_linears(block, [block])
    merged = merge_lora_state_dict(block.state_dict(), lora_scalings(block))
    plain = nn.Linear(64, 48)
    plain.load_state_dict({k.removeprefix("0."): v for k, v in merged.items()})
    x = torch.randn(7, 64, generator=gen)
    assert torch.allclose(plain(x), block(x), atol=1e-5)


def test_built_model_counts_nf4_weights_as_the_weights_they_stand_for(tiny_args):
    config = tiny_args(lang_lora_dim=4)
    plain = count_parameters(build_model(config).model)
    built = build_model(config, speed=SpeedOptions(nf4_base=True, nf4_vision=True))
    counts = count_parameters(built.model)
    assert [(c.name, c.total, c.trainable) for c in counts] == [(c.name, c.total, c.trainable) for c in plain]
    quantised = {c.name: c.nf4 for c in counts}
    assert quantised["language model"] > 0 and quantised["vision encoder"] > 0 and quantised["LM LoRA"] == 0
    assert BITS_PER_WEIGHT == pytest.approx(4.127, abs=1e-3)


def test_the_probe_finds_that_this_cpu_runs_nf4():
    assert nf4_problem("cpu") is None


def test_the_probe_names_a_device_bitsandbytes_cannot_run_on():
    # the meta device has no data, so no backend can quantise there: the probe's failure branch, for real
    problem = nf4_problem("meta")
    assert problem is not None and problem.startswith("bitsandbytes cannot run NF4 on meta here (")
