"""Optimizer parameter groups and the learning-rate schedule.

The seed's four groups are {decay, no decay} x {``--learning_rate``, the "embed" rate}.
A component given its own rate or weight decay (``--projector_learning_rate``,
``--lm_weight_decay``, ...) is taken out of them into its own pair of groups, named
after it (``projector_decay``, ``projector_no_decay``), as LLaVA's ``mm_projector_lr``
and ms-swift's ``aligner_lr`` do; the log and TensorBoard show every group's rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_scheduler

from mmtrain.compat import torch as torch_compat
from mmtrain.model.counting import component_of

# Optimizer components: what each model component (mmtrain.model.counting) is tuned as.
OPTIMIZER_COMPONENTS = {
    "projector": "projector",
    "vision encoder": "vision",
    "vision LoRA": "vision",
    "LM LoRA": "lm_lora",
    "language model": "lm",
    "new token embeddings": "embed",
    "LM input embeddings": "embed",
}


def _no_decay(name: str, param: nn.Parameter, norm_params: set[int]) -> bool:
    """Biases and the weights of every normalisation layer are never decayed."""
    return name.endswith(".bias") or param.ndim < 2 or id(param) in norm_params


def _normalization_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters owned by norm layers, found by type *and* by class name.

    Class names catch norms that are not ``nn.LayerNorm`` subclasses (LlamaRMSNorm,
    Qwen2RMSNorm, T5LayerNorm, ...); this is why we do not test for "LayerNorm" in the
    parameter name as the reference does: RMSNorm weights are named ``input_layernorm``
    in LLaMA but ``norm`` in other models.
    """
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, torch_compat.BatchNormBase))
        if is_norm or "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    learning_rate: float,
    embed_learning_rate: float,
    components: dict[str, dict] | None = None,
) -> list[dict]:
    """The seed's four groups, with components that have their own settings split off.

    Seed groups: {decay, no decay} x {``learning_rate``, ``embed_learning_rate``}; a
    parameter with "embed" in its name (the new token rows, the whole table if it
    trains) gets ``embed_learning_rate`` (``--learning_rate_pretraining_components``).
    ``components`` maps an optimizer component (projector, vision, lm_lora, lm, embed;
    see :data:`OPTIMIZER_COMPONENTS`) to ``{"lr": ..., "weight_decay": ...}`` (either
    may be missing or None: the seed's value then holds); its parameters go to
    ``<component>_decay`` and ``<component>_no_decay``. Biases and norm weights never
    decay. Only trainable parameters appear; empty groups are dropped. Each group
    carries a ``name`` for logging.
    """
    norms = _normalization_parameters(model)
    groups = {
        "decay": {"params": [], "weight_decay": weight_decay, "lr": learning_rate},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": learning_rate},
        "embed_decay": {"params": [], "weight_decay": weight_decay, "lr": embed_learning_rate},
        "embed_no_decay": {"params": [], "weight_decay": 0.0, "lr": embed_learning_rate},
    }
    own = {k: {key: v for key, v in values.items() if v is not None} for k, values in (components or {}).items()}
    own = {k: v for k, v in own.items() if v}
    for component, values in own.items():
        if component not in set(OPTIMIZER_COMPONENTS.values()):
            raise ValueError(f"unknown optimizer component {component!r}; known: {', '.join(sorted(set(OPTIMIZER_COMPONENTS.values())))}")
        base_lr = embed_learning_rate if component == "embed" else learning_rate
        lr = values.get("lr", base_lr)
        groups[f"{component}_decay"] = {"params": [], "weight_decay": values.get("weight_decay", weight_decay), "lr": lr}
        groups[f"{component}_no_decay"] = {"params": [], "weight_decay": 0.0, "lr": lr}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = "no_decay" if _no_decay(name, param, norms) else "decay"
        component = OPTIMIZER_COMPONENTS[component_of(name)]
        if component in own:
            key = f"{component}_{decay}"
        else:
            key = ("embed_" if "embed" in name else "") + decay
        groups[key]["params"].append(param)
    return [{"name": key, **group} for key, group in groups.items() if group["params"]]


def param_group_names(model: nn.Module, groups: list[dict]) -> dict[str, list[str]]:
    """Which named parameters landed in which group (for logs and tests)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [by_id[id(p)] for p in g["params"]] for g in groups}


def warmup_steps(num_warmup_steps: float, total_steps: int) -> int:
    """Warmup length in optimizer steps.

    A value > 1 is a step count. A value <= 1 is a ratio of ``total_steps``, rounded up;
    exactly 1 therefore means the whole run is warmup (the rate climbs linearly and
    reaches its peak only on the last step), and 0 means no warmup. Note that 1 is
    read as the ratio 100%, never as "one step"; write 2 for a two-step warmup.
    """
    if num_warmup_steps > 1:
        return int(num_warmup_steps)
    return math.ceil(num_warmup_steps * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, num_warmup_steps: float, total_steps: int):
    """Cosine, linear or constant decay after a linear warmup (transformers' schedules)."""
    warmup = warmup_steps(num_warmup_steps, total_steps)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
