"""peft internals: the LoRA layer state fused LoRA reads and the state-dict names LoRA export merges by.

Fused LoRA replaces the forward of peft's LoRA ``Linear`` and therefore reads the layer
state peft's own forward reads (the adapter dicts and the enabled/merged/active flags);
LoRA export merges from peft's state-dict names. None of this is documented API. A
renamed attribute raises AttributeError in the first forward; a changed *meaning*
(e.g. ``scaling`` no longer alpha / r, dropout no longer Identity when off) would make
"""

from __future__ import annotations

from typing import Callable

from torch import nn


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
