"""The Accelerator: DeepSpeed and precision from the Accelerate config, made before any weights load.

Accelerate reads the YAML given to ``accelerate launch --config_file`` (or the one
``accelerate config`` wrote). Creating the Accelerator first matters at ZeRO-3: it
installs the DeepSpeed config transformers looks for, so ``from_pretrained`` builds the
LM's weights already partitioned (``deepspeed.zero.Init``) instead of materialising a
full copy on every rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings

import torch

from mmtrain.compat import accelerate as accelerate_compat
from mmtrain.compat import transformers as transformers_compat
from mmtrain.args import ConfigError, TrainArguments

# ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed-VisualChat's
# value): norms, biases and the new-token rows then cost no gather per step.
PARAM_PERSISTENCE_THRESHOLD = 10_000


def prepare_environment() -> None:
    """Select DeepSpeed's CPU accelerator when there is no GPU (before deepspeed is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO-3 calls a collective torch has renamed, once per gather: one
    # warning per parameter per step would drown the log.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def make_accelerator(train_args: TrainArguments):
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    kwargs_handlers = []
    launched = "LOCAL_RANK" in os.environ or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if launched and not torch.cuda.is_available():
        # DeepSpeed on CPU needs gloo; without it Accelerate counts one process and
        # DeepSpeed's batch-size check fails.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=_gradient_accumulation(train_args),
            log_with="tensorboard" if train_args.enable_tensorboard else None,
            project_config=ProjectConfiguration(project_dir=train_args.output_dir, logging_dir=os.path.join(train_args.output_dir, "tensorboard")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=kwargs_handlers,
            step_scheduler_with_optimizer=False,
        )
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"the Accelerate config cannot be used: {e}") from None
    _complete_deepspeed_config(accelerator, train_args)
    return accelerator


# How long the processes of a run wait for each other to compare their flags, right after
# they have all joined the process group (seconds; they arrive within a few).
FLAG_CHECK_TIMEOUT_S = 300


def check_same_flags(accelerator, *flag_groups) -> None:
    """Every process was started with the same flags and Accelerate settings; else all stop, naming the first difference.

    Processes of one ``accelerate launch`` share a command line, but machines of a
    multi-machine run are launched one by one, and a flag typed differently on one of them
    (a batch size, a step count, a DeepSpeed stage) would surface much later as processes
    waiting forever for each other in a collective. Right after the process group forms,
    every process therefore shares its parsed flags (one ``all_gather_object``, which each
    process reaches at the same point) and every process compares them all, so each raises
    the same error instead of leaving the others waiting. The exchange runs in a gloo group
    of its own with a short timeout: objects travel on the CPU whatever the backend of the
    run, and a process that never arrives ends the wait with an error, not a hang.
    """
    if accelerator.num_processes == 1:
        return
    import socket
    from dataclasses import asdict
    from datetime import timedelta

    import torch.distributed as dist

    flags = {f"--{k}": v for group in flag_groups for k, v in asdict(group).items()}
    flags.update({
        "the Accelerate config's distributed_type": str(accelerator.distributed_type),
        "the Accelerate config's mixed_precision": accelerator.mixed_precision,
        "the Accelerate config's zero_stage": zero_stage(accelerator),
    })
    mine = {"host": socket.gethostname(), "flags": json.dumps(flags, sort_keys=True, default=str)}
    everyone: list = [None] * accelerator.num_processes
    try:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=FLAG_CHECK_TIMEOUT_S))
        dist.all_gather_object(everyone, mine, group=group)
    except RuntimeError as e:  # gloo's timeout, or a peer that went away
        raise ConfigError(
            f"the processes could not compare their flags within {FLAG_CHECK_TIMEOUT_S} s ({e}); a machine stopped at start-up: see its log"
        ) from None
    dist.destroy_process_group(group)
    first = json.loads(everyone[0]["flags"])
    for rank, other in enumerate(everyone[1:], start=1):
        theirs = json.loads(other["flags"])
        for name in sorted(set(first) | set(theirs)):
            if first.get(name) != theirs.get(name):
                raise ConfigError(
                    f"process {rank} (host {other['host']}) was started with {name} {theirs.get(name)!r}, process 0 "
                    f"(host {everyone[0]['host']}) with {first.get(name)!r}: launch every machine with the same flags and config"
                )


# Threads of a run that is one CPU process; unset: every core the process may run on.
CPU_THREADS_ENV = "MMTRAIN_CPU_THREADS"


def close_process_group() -> None:
    """Tear down the process group of a run that stopped on an error, as ``end_training`` does for one that finished.

    Left to the interpreter's exit, gloo's worker threads can be destroyed while still
    joinable, and the process aborts ("terminate called without an active exception")
    instead of returning its exit status. Nothing here talks to the other processes.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def set_cpu_threads(accelerator) -> None:
    """A run that is one CPU process computes on every core it may use, however it was started.

    ``accelerate launch`` exports ``OMP_NUM_THREADS=1`` unless told otherwise (its default
    for processes that share a machine, applied even when there is one process and no
    GPU), while ``python -m mmtrain.train`` gets torch's default of one thread per core:
    each step of the embedded default took 1.4 to 1.6 times as long through the launcher
    on two idle cores, with the same losses. The count is therefore decided here, the same
    for both entry points; ``MMTRAIN_CPU_THREADS`` (not ``OMP_NUM_THREADS``, which
    launchers set) asks for another, e.g. 1 on a machine busy with other processes, where
    threads that wait for each other also wait for those. Processes of a multi-process run
    keep the launcher's share, and a GPU process its default.
    """
    if accelerator.num_processes != 1 or accelerator.device.type != "cpu":
        return
    wanted = os.environ.get(CPU_THREADS_ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ConfigError(f"{CPU_THREADS_ENV}={wanted!r}: expected a whole number of threads >= 1")
        threads = int(wanted)
    else:
        threads = _usable_cores()
    torch.set_num_threads(threads)


AUTO_WORKERS = 4  # loader workers per GPU process by default: enough to hide a budget batch's 14 images and packing


def loader_workers(requested: int, device: torch.device, *, local_processes: int = 1, streaming: bool = False) -> int:
    """``--num_workers`` as given; -1 (default): 4 per GPU process where the cores allow, 0 on CPU and for streams.

    Without workers each step of ref-7b on an H200 waited 0.08-0.15 s for its next batch
    (decoding, resizing and packing on the training process): 4 workers took the
    token-budget mix from 14,204 to 16,337 tokens/s (benchmarks/README.md). On a CPU the
    workers would take cores from the training threads themselves. A ``--streaming``
    run reads its own shards in the training process.
    """
    if requested >= 0:
        return requested
    if torch.device(device).type == "cpu" or streaming:
        return 0
    per_process = _usable_cores() // max(1, local_processes)
    return max(0, min(AUTO_WORKERS, per_process - 1))  # one core stays with the training process


def local_process_count(accelerator) -> int:
    """Processes of this run on this machine (torch's launchers export ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset and cpusets
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def log_process(accelerator, loader_workers: int) -> None:
    """What decides a run's numbers and speed beyond its flags, in one line: two launches of one run compare by it."""
    if accelerator.is_main_process:
        logging.getLogger("mmtrain").info(
            f"process: {accelerator.num_processes} x {accelerator.device}, {accelerator.state.distributed_type}, "
            f"mixed precision {accelerator.mixed_precision}, {torch.get_num_threads()} CPU threads and "
            f"{loader_workers} loader workers per process"
        )


def _gradient_accumulation(train_args: TrainArguments) -> int:
    """The flag wins; else the config's value; a conflict between the two is an error."""
    from_config = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if from_config and from_config.isdigit() and train_args.gradient_accumulation_steps is not None:
        if int(from_config) != train_args.gradient_accumulation_steps:
            raise ConfigError(
                f"--gradient_accumulation_steps {train_args.gradient_accumulation_steps} disagrees with the Accelerate "
                f"config's gradient_accumulation_steps {from_config}; set it in one place"
            )
    if train_args.gradient_accumulation_steps is not None:
        return train_args.gradient_accumulation_steps
    return int(from_config) if from_config and from_config.isdigit() else 1


def deepspeed_plugin(accelerator):
    return accelerator.state.deepspeed_plugin


def zero_stage(accelerator) -> int:
    plugin = deepspeed_plugin(accelerator)
    return int(plugin.zero_stage) if plugin is not None else -1


def _complete_deepspeed_config(accelerator, train_args: TrainArguments) -> None:
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    offload_param = (zero.get("offload_param") or {}).get("device", "none")
    if offload_param not in (None, "none") and stage != 3:
        raise ConfigError(
            f"offload_param_device: {offload_param} needs zero_stage: 3 (the config says {stage}); "
            "use offload_optimizer_device for stages 1-2"
        )
    if offload_opt not in (None, "none") and stage == 0:
        raise ConfigError(f"offload_optimizer_device: {offload_opt} needs zero_stage >= 1 (the config says 0)")
    if offload_opt not in (None, "none"):
        # With optimizer states offloaded, Accelerate replaces whatever optimizer it is
        # given by a new DeepSpeed CPU Adam unless this is false. The schedule would then
        # drive an optimizer that never steps (every rank warned that lr_scheduler.step()
        # ran before optimizer.step()). make_optimizer already builds DeepSpeed's CPU Adam
        # in this case, all the setting asks for, so ours is kept.
        config["zero_force_ds_cpu_optimizer"] = False
    _check_batch_sizes(config, train_args, accelerator.num_processes)
    clip = config.get("gradient_clipping", "auto")
    if train_args.max_grad_norm is not None:
        if clip not in ("auto", None) and float(clip) != train_args.max_grad_norm:
            raise ConfigError(
                f"--max_grad_norm {train_args.max_grad_norm} disagrees with the DeepSpeed config's gradient_clipping {clip}"
            )
        config["gradient_clipping"] = train_args.max_grad_norm
    elif clip in ("auto", None):
        config["gradient_clipping"] = 1.0
    bf16 = config.get("bf16")
    if isinstance(bf16, dict) and str(bf16.get("enabled")).lower() == "true" and "check_grad_overflow" not in bf16:
        # DeepSpeed's bf16 overflow scan runs ~7 small kernels per trainable tensor every
        # step (amax, amin, isfinite, ...; 450 tensors with LoRA on a 7B model) and
        # then waits for the GPU: CPU-bound time in which the GPU idles. bf16 has fp32's
        # range, and the loop stops on a non-finite loss before any checkpoint is
        # written, so the scan is off unless the DeepSpeed config asks for it.
        bf16["check_grad_overflow"] = False
    if stage == 3:
        zero.setdefault("stage3_param_persistence_threshold", PARAM_PERSISTENCE_THRESHOLD)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if accelerate_compat.zero3_init_enabled(plugin):
            accelerate_compat.reinstall_hf_deepspeed_config(plugin)  # so zero.Init sees the values above


def _check_batch_sizes(config: dict, train_args: TrainArguments, num_processes: int) -> None:
    """A DeepSpeed config with fixed batch sizes must agree with the flags (DeepSpeed would fail later)."""
    gas = config.get("gradient_accumulation_steps", "auto")
    gas = train_args.gradient_accumulation_steps or (gas if isinstance(gas, int) else 1)
    micro = config.get("train_micro_batch_size_per_gpu", "auto")
    if isinstance(micro, int) and micro != train_args.per_device_train_batch_size:
        raise ConfigError(
            f"the DeepSpeed config's train_micro_batch_size_per_gpu {micro} differs from --per_device_train_batch_size "
            f"{train_args.per_device_train_batch_size}; set it to \"auto\" or make them equal"
        )
    total = config.get("train_batch_size", "auto")
    expected = train_args.per_device_train_batch_size * gas * num_processes
    if isinstance(total, int) and total != expected:
        raise ConfigError(
            f"the DeepSpeed config's train_batch_size {total} is not --per_device_train_batch_size "
            f"{train_args.per_device_train_batch_size} x gradient accumulation {gas} x {num_processes} processes = {expected}; "
            'set it to "auto" or change the batch flags so that they divide it'
        )


def max_grad_norm(accelerator, train_args: TrainArguments) -> float:
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None:
        return float(plugin.deepspeed_config["gradient_clipping"])
    return train_args.max_grad_norm if train_args.max_grad_norm is not None else 1.0


def offloads_optimizer(accelerator) -> bool:
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return False
    device = (plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def compute_dtype(accelerator) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def frozen_vision_context(accelerator):
    """At ZeRO-3, load the frozen vision encoder without ``zero.Init`` (it stays whole, outside the engine)."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is not None and accelerate_compat.zero3_init_enabled(plugin):
        return _without_zero3_init(plugin)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_zero3_init(plugin):
    # transformers decides on zero.Init from the DeepSpeed config it was handed; Accelerate's
    # own zero3_init_context_manager(enable=False) re-installs a stage-3 config, so
    # from_pretrained would still partition. Remove the config for the duration instead.
    transformers_compat.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerate_compat.reinstall_hf_deepspeed_config(plugin)


def make_optimizer(accelerator, groups: list[dict], learning_rate: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """AdamW (``--adam_beta1/2``, ``--adam_epsilon``); DeepSpeed's CPU Adam when optimizer states are offloaded (its fast path)."""
    if offloads_optimizer(accelerator):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=learning_rate, betas=betas, eps=eps, adamw_mode=True)
    fused = accelerator.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)
