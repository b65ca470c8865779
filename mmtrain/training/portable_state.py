"""The trainable state in a form any process count can load: whole fp32 values, Adam moments, step.

Beside what Accelerate and DeepSpeed write (per rank, partitioned at ZeRO 1-3), every
checkpoint holds ``trainable_state.safetensors``: for each trainable parameter its full
fp32 master value (``param/<name>``) and Adam moments (``exp_avg/<name>``,
``exp_avg_sq/<name>``), and the optimizer's step count in the file's metadata. mmtrain's
trainable state is small (projector, LoRA, new embedding rows: a few MB for the tiny
presets, some hundreds of MB for a 7B model with LoRA), so a whole copy costs little.

Under DeepSpeed it is gathered and scattered with DeepSpeed's public helpers
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and
their ``safe_set_`` twins), which cover ZeRO 1, 2, 3 and the bf16 optimizer (ZeRO 0 with
bf16), optimizer offload included. Where they have nothing to say (no DeepSpeed, or a
DeepSpeed optimizer that keeps no separate master copy) the parameter is its own master
and the optimizer's state for it is whole on every process.

We chose this over DeepSpeed's universal checkpoint. That needs an offline conversion of
the partitioned files (``python -m deepspeed.checkpoint.ds_to_universal``) and a config
switch to load them, covers DeepSpeed runs only (the single-process path writes no
DeepSpeed files), and does not take our checkpoints: run on a ZeRO-2 checkpoint of the
tiny presets written through Accelerate (DeepSpeed 0.19.8), the conversion stops with
"Required universal_checkpoint_info state is missing in checkpoint", a record that
Megatron-style trainers pass to ``save_checkpoint`` themselves and Accelerate's
``save_state`` does not.
"""

from __future__ import annotations

import contextlib

import torch
from safetensors.torch import load_file, save_file

from mmtrain import compat
from mmtrain.model.errors import ConfigError

PORTABLE_STATE = "trainable_state.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    from accelerate.utils import extract_model_from_parallel

    return [(n, p) for n, p in extract_model_from_parallel(model).named_parameters() if p.requires_grad]


def _deepspeed_helpers(deepspeed: bool):
    """DeepSpeed's full-state getters and setters (its public ``deepspeed.utils``), or None without DeepSpeed."""
    if not deepspeed:
        return None
    from deepspeed import utils

    return utils


def gather(model, optimizer, deepspeed: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Every trainable parameter's full fp32 value and moments (on the CPU), and the step count.

    A collective under DeepSpeed: every process calls it, in the same order.
    """
    ds = _deepspeed_helpers(deepspeed)
    if ds is not None:
        compat.link_zero_optimizer_state(optimizer)
    masters = compat.fp32_masters(optimizer)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(model):
        value = ds.safe_get_full_fp32_param(p) if ds else None
        if value is not None:
            moments = {k: ds.safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            value, moments = _local_master(p, optimizer, masters)
        tensors[f"param/{name}"] = value.detach().float().cpu().contiguous()
        for k, m in moments.items():
            if m is None:  # no optimizer step yet
                m = torch.zeros_like(tensors[f"param/{name}"])
            tensors[f"{k}/{name}"] = m.detach().float().cpu().contiguous()
    step = compat.adam_step_count(optimizer) or 0
    return tensors, step


def save(path: str, tensors: dict[str, torch.Tensor], step: int) -> None:
    save_file(tensors, path, metadata={"optimizer_step": str(step)})


def read(path: str) -> tuple[dict[str, torch.Tensor], int]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if "optimizer_step" not in metadata:
        raise ConfigError(f"{path}: no optimizer_step in its metadata; it was not written by this trainer")
    return load_file(path), int(metadata["optimizer_step"])


def load_into(model, optimizer, tensors: dict[str, torch.Tensor], step: int, deepspeed: bool, source: str) -> None:
    """Write ``tensors`` (from :func:`gather`, maybe on another process count) into a freshly prepared engine.

    Sets the fp32 master copies, the compute-dtype weights the forward uses, the Adam
    moments and the step count. A collective under DeepSpeed, like :func:`gather`.
    """
    params = _trainable(model)
    for name, p in params:
        for key in ("param", *MOMENTS):
            value = tensors.get(f"{key}/{name}")
            if value is None:
                raise ConfigError(f"{source}: no {key}/{name}; it holds the trainable state of another model")
            if value.numel() != compat.full_numel(p):
                raise ConfigError(f"{source}: {key}/{name} has {value.numel()} elements, the model's parameter {compat.full_numel(p)}")
    ds = _deepspeed_helpers(deepspeed)
    compat.create_adam_state(optimizer, step)
    compat.link_zero_optimizer_state(optimizer)
    masters = compat.fp32_masters(optimizer)
    for name, p in params:
        value = tensors[f"param/{name}"]
        if ds is not None and ds.safe_get_full_fp32_param(p) is not None:
            ds.safe_set_full_fp32_param(p, value.to(torch.float32))
            for k in MOMENTS:
                ds.safe_set_full_optimizer_state(p, tensors[f"{k}/{name}"], k)
        else:
            master, moments = _local_master(p, optimizer, masters)
            master.copy_(value.view_as(master))  # a view: into the parameter itself, or its flat fp32 master
            for k, m in moments.items():
                m.copy_(tensors[f"{k}/{name}"].view_as(m))
        with _whole(p, ds):
            p.data.copy_(value.view(p.shape).to(p.dtype))


def _local_master(p, optimizer, masters) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``p``'s fp32 master and Adam moments, as views into what the optimizer steps, where each process holds them whole.

    That is: no DeepSpeed (the parameter is its own master), or DeepSpeed at ZeRO 0 with a
    mixed-precision wrapper that keeps masters apart (:func:`mmtrain.compat.fp32_masters`).
    """
    base = compat.base_optimizer(optimizer)
    if id(p) not in masters:
        state = base.state.get(p, {})
        return p.detach(), {k: state.get(k) for k in MOMENTS}
    held, offset = masters[id(p)]
    state = base.state.get(held, {})

    def view(t):
        return None if t is None else t.view(-1).narrow(0, offset, p.numel()).view(p.shape)

    return view(held.detach()), {k: view(state.get(k)) for k in MOMENTS}


def _whole(p, ds):
    """A ZeRO-3 parameter gathered for writing (every rank writes the same value), else as it is."""
    if ds is None or not compat.is_zero3_partitioned(p):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
