"""LoRA through peft, scoped the way DeepSpeed-VisualChat scopes it, and fusing into a copy.

``--lang_lora_module_name model.layers.`` means: every ``nn.Linear`` whose qualified
name contains ``model.layers.`` gets an adapter. The default, ``auto``, is the LM's own
decoder layers (``model.layers.``, ``gpt_neox.layers.``, ``transformer.h.``: see
:func:`mmtrain.model.builder.lora_scope`). We resolve that scope to an explicit
list of module names and hand it to peft, so a scope that matches nothing fails at
once and the log can say exactly which modules were adapted.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mmtrain.compat import peft as peft_compat
from mmtrain.model.errors import ConfigError

ADAPTER = "default"
# Default alpha = 2 x rank (scale 2), as LLaVA-1.5's LoRA recipe (rank 128, alpha 256).
# The embedded default sets its own (scale 4: its tiny adapters learn faster so).
DEFAULT_ALPHA_PER_RANK = 2


def lora_targets(module: nn.Module, scope: str) -> list[str]:
    """Names of the Linear layers inside ``module`` whose name contains ``scope``."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) and scope in name]


def apply_lora(module: nn.Module, *, rank: int, scope: str, alpha: float | None, dropout: float, field: str) -> list[str]:
    """Inject LoRA adapters in place; returns the adapted module names.

    Adapters start as an exact no-op (B = 0), so a freshly adapted model computes what
    the base model computes. ``field`` is the config field that gave ``scope`` (named if it matches nothing).
    """
    targets = lora_targets(module, scope)
    if not targets:
        linears = sorted({n.rsplit(".", 1)[0] for n, m in module.named_modules() if isinstance(m, nn.Linear) and "." in n})
        hint = ", ".join(linears[:6]) + (" ..." if len(linears) > 6 else "")
        raise ConfigError(f"{field} {scope!r} matches no Linear layer; Linear layers live under: {hint}", fields=(field,))
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else DEFAULT_ALPHA_PER_RANK * rank),
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    return targets


def is_lora_parameter(name: str) -> bool:
    return peft_compat.LORA_NAME_MARK in name


def lora_scalings(module: nn.Module, prefix: str = "") -> dict[str, float]:
    """``{qualified name of each adapted layer: alpha / rank}``."""
    scalings = {}
    for name, sub in module.named_modules():
        scale = peft_compat.lora_scaling(sub, ADAPTER)
        if scale is not None:
            scalings[f"{prefix}{name}"] = scale
    return scalings


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """Fuse LoRA into a *copy*: ``W + scale * B @ A`` per adapted layer, adapters removed.

    The training weights are never touched, so "fuse -> save -> unfuse" leaves them
    bit-identical in any precision (fusing in place and subtracting again drifts in
    bf16/fp16). The product is formed in fp32 and rounded once to the weight's dtype.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_lora_parameter(key):
            continue
        layer, sep, leaf = key.rpartition(peft_compat.BASE_LAYER_MARK)
        if sep and layer in scalings and leaf == "weight":
            a_name, b_name = peft_compat.lora_weight_names(layer, ADAPTER)
            a, b = state_dict[a_name].float(), state_dict[b_name].float()
            value = (value.float() + scalings[layer] * (b @ a)).to(value.dtype)
        merged[key.replace(peft_compat.BASE_LAYER_MARK, ".")] = value
    return merged


def lora_inputs_follow_autocast(module: nn.Module) -> int:
    """Stop peft from upcasting LoRA inputs to the adapters' fp32 dtype while autocast is on; returns the layers changed.

    Plain mixed precision keeps the trainable LoRA weights in fp32 and the frozen base in
    bf16/fp16. peft's LoRA ``forward`` then casts each adapted layer's (half-precision)
    input to fp32 before ``lora_A``, and autocast casts it straight back to half for the
    product: two extra passes over the activation per adapted layer in forward and two
    in backward, and ``lora_A`` saves its own copy of the input instead of sharing the
    base layer's. Both casts are exact (half -> fp32 -> half), so skipping them while
    autocast is on gives the same numbers. Without autocast (generation, fp32 runs) the
    cast stays: it is what lets an fp32 adapter take a half-precision input.
    Under DeepSpeed the whole module, adapters included, is in the compute dtype, so
    there is no cast to skip.
    """
    return sum(peft_compat.wrap_lora_input_cast(sub, _cast_unless_autocast) for sub in module.modules())


def _cast_unless_autocast(cast):
    def cast_input(x, dtype):
        if x is not None and torch.is_autocast_enabled(x.device.type):
            return x
        return cast(x, dtype)

    cast_input.__wrapped__ = cast
    return cast_input
