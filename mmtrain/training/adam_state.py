"""Adam state made by hand: what a resume on another process count writes moments into.

A resume on another process count writes each trainable parameter's Adam moments and
step back into a freshly built engine. DeepSpeed's public setters
(``deepspeed.utils.safe_set_full_optimizer_state``) write into state that must already
exist, and ZeRO 1/2 and the bf16 optimizer create it at their first step. The functions
below create it as that first step would; where DeepSpeed's wrappers keep it is
:mod:`mmtrain.compat.deepspeed`'s business.
"""

from __future__ import annotations

import torch

from mmtrain.compat.deepspeed import base_optimizer


def _ds_cpu_adam(optimizer) -> bool:
    return type(optimizer).__name__ == "DeepSpeedCPUAdam"


def adam_step_count(optimizer) -> int | None:
    """The steps the base optimizer has applied (None before its first): every parameter's state counts the same."""
    for state in base_optimizer(optimizer).state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return None


def create_adam_state(optimizer, step: int) -> None:
    """Give every parameter of the base optimizer the state its first step would create, at ``step``.

    Zero moments; ``step`` as the optimizer keeps it: a 0-d float tensor for torch's Adam
    family (on the CPU unless ``fused``/``capturable``, as ``torch.optim.adam`` lays it
    out), a Python int for DeepSpeed's CPU Adam. State that exists keeps its moments and
    gets the step. Under a ZeRO 1/2 or bf16 optimizer, the wrapper must then be linked to
    the new state (:func:`mmtrain.compat.deepspeed.link_zero_optimizer_state`).
    """
    base = base_optimizer(optimizer)
    cpu_adam = _ds_cpu_adam(base)
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    tensors = {id(p): p for g in base.param_groups for p in g["params"]}
    # ZeRO-3 empties the base optimizer's groups between steps and keeps the fp32
    # partitions it steps (the keys of the base state) in ``fp32_partitioned_groups_flat``.
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "fp32_partitioned_groups_flat"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is not None:
        tensors.update({id(p): p for p in wrapper.fp32_partitioned_groups_flat})
    for p in tensors.values():
        state = base.state[p]
        if "exp_avg" not in state:
            dtype = torch.float32 if cpu_adam else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if cpu_adam:
            state["step"] = int(step)
        else:
            state["step"] = torch.tensor(float(step), dtype=scalar, device=p.device if on_device else "cpu")
