"""mmtrain's side of the throughput bench: a training run set up by the trainer's own code, timed step by step.

One process, or each of N started by a launcher (``torch.distributed.run``, ``accelerate
launch``): the Accelerator from ``distributed.make_accelerator`` with Accelerate's
DeepSpeed plugin, configured through the environment ``accelerate launch --config_file
accelerate_configs/zeroN.yaml`` sets; then what ``mmtrain.train`` does (build, loaders
with the training collator, ``EngineView``, optimizer and schedule, ``prepare``, which
shards the batches over the processes), and each timed step is ``Loop.train_step``
itself. With N processes the sample sets are N times larger, so that every process
runs ``--steps`` timed steps, and the figures are the group's (:func:`timing.across_ranks`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import asdict

from timing import across_ranks, timed_run
from workload import SyntheticSamples, span_length


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_environment(opts) -> dict:
    """What ``accelerate launch --config_file accelerate_configs/zeroN[_offload].yaml`` puts in the environment."""
    if opts.zero_stage is None:  # single_process.yaml with bf16: plain mixed precision, one process
        return {"ACCELERATE_MIXED_PRECISION": "bf16" if opts.precision == "bf16" else "no", "ACCELERATE_USE_DEEPSPEED": "false"}
    opt_dev = "cpu" if opts.offload in ("optimizer", "optimizer+params") else "none"
    par_dev = "cpu" if opts.offload == "optimizer+params" else "none"
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16" if opts.precision == "bf16" else "no",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(opts.zero_stage),
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
        "ACCELERATE_GRADIENT_CLIPPING": "1.0",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": opt_dev,
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": par_dev,
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(opts.zero_stage == 3).lower(),
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": str(opts.zero_stage == 3).lower(),
        "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,offload_optimizer_device,offload_param_device,gradient_accumulation_steps,"
        "gradient_clipping,zero3_init_flag,zero3_save_16bit_model,mixed_precision",
    }
    dist = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in dist.items():
        env.setdefault(k, os.environ.get(k, v))
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT", str(_free_port()))
    return env


def timed_samples(opts, data_args, image_span: int, steps: int | None = None) -> int:
    """Samples in the timed set: ``steps`` micro-batches of ``--micro_batch``, or about ``steps`` token budgets of mean-length samples."""
    steps = opts.steps if steps is None else steps
    if not data_args.max_tokens_per_batch:
        return steps * opts.micro_batch
    mean_length = image_span + sum(opts.text_tokens) / 2
    return max(1, math.ceil(steps * data_args.max_tokens_per_batch / mean_length))


def deepspeed_settings(items: list[str]) -> dict:
    """``--deepspeed_set`` as {dotted key: value}: numbers as int (``2.2e8`` too) or float, true/false as bool, else the text."""
    settings = {}
    for item in items:
        key, _, text = item.partition("=")
        value: object = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            try:
                number = float(text)
                value = int(number) if number.is_integer() else number
            except ValueError:
                pass
        settings[key] = value
    return settings


def apply_deepspeed_settings(accelerator, items: list[str]) -> None:
    """``--deepspeed_set KEY=VALUE``: into the DeepSpeed config the engine will be made from (dotted keys)."""
    if not items:
        return
    from mmtrain.compat import accelerate as accelerate_compat

    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        raise ValueError("--deepspeed_set needs DeepSpeed (--zero_stage 0-3)")
    for key, value in deepspeed_settings(items).items():
        *parents, last = key.split(".")
        node = plugin.deepspeed_config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    if accelerate_compat.zero3_init_enabled(plugin):
        accelerate_compat.reinstall_hf_deepspeed_config(plugin)  # zero.Init reads the config too


class _LoopSteps:
    """A loader as the training loop steps through it (a token budget's steps counted ahead), still sized."""

    def __init__(self, loop, loader):
        self.loop, self.loader = loop, loader

    def __iter__(self):
        return iter(self.loop.micro_batches(self.loader))

    def __len__(self) -> int:
        return len(self.loader)


def run_mmtrain(opts, model_args, data_args, train_args, tokenizer, image_tokens, image_size: int, shape: dict) -> dict:
    """``opts.steps`` timed steps of ``Loop.train_step``, set up as ``mmtrain.train`` sets up a run of these arguments."""
    from mmtrain.training.distributed import prepare_environment

    prepare_environment()
    os.environ.update(accelerate_environment(opts))

    from accelerate.utils import set_seed

    from mmtrain.compat import transformers as transformers_compat
    from mmtrain.model.builder import check_model_config
    from mmtrain.model.counting import count_parameters
    from mmtrain.training import distributed, setup, speedups
    from mmtrain.training.checkpoint import TrainerState
    from mmtrain.training.engine_view import EngineView, Prepared
    from mmtrain.training.loop import Loop, LoopInputs, RunFlags

    check_model_config(model_args)
    accelerator = distributed.make_accelerator(train_args)
    apply_deepspeed_settings(accelerator, opts.deepspeed_set)
    speedups.check_fp8(accelerator, train_args)
    speedups.check_quantize(accelerator, train_args)
    data_args.num_workers = distributed.loader_workers(data_args.num_workers, accelerator.device, local_processes=distributed.local_process_count(accelerator))
    set_seed(train_args.seed)
    # A 4-bit base is drawn on the CPU and reaches the GPU quantised, as training does (setup.build_for_training).
    on_device = opts.build_on_device == "on" or (
        opts.build_on_device == "auto" and accelerator.device.type == "cuda" and distributed.zero_stage(accelerator) != 3
        and train_args.quantize_base != "nf4"
    )
    build_start = time.perf_counter()
    with (accelerator.device if on_device else contextlib.nullcontext()):
        built = setup.build_for_training(accelerator, model_args, train_args, data_args)
    if accelerator.is_main_process:
        print(f"[bench] model built in {time.perf_counter() - build_start:.1f} s", flush=True)
    if built.image_tokens != image_tokens:
        raise RuntimeError(f"image token layout differs from the model's: {built.image_tokens} vs {image_tokens}")
    counts = {c.name: {"total": c.total, "trainable": c.trainable} for c in count_parameters(built.model)}

    world = accelerator.num_processes
    n_timed = timed_samples(opts, data_args, span_length(image_tokens)) * world
    timed = SyntheticSamples(n_timed, image_tokens, opts.text_tokens, opts.label_fraction, image_size, tokenizer.bos_token_id, opts.seed)
    warm = SyntheticSamples(timed_samples(opts, data_args, span_length(image_tokens), opts.warmup) * world, image_tokens, opts.text_tokens,
                            opts.label_fraction, image_size, tokenizer.bos_token_id, opts.seed + 7919)
    collator = speedups.make_train_collator(built, model_args, data_args)
    if data_args.max_tokens_per_batch:  # the trainer's own budget sampler (seeded shuffle, as in training)
        loader = setup.make_train_loader(accelerator, timed, collator, data_args, train_args)
        warm_loader = setup.make_train_loader(accelerator, warm, collator, data_args, train_args)
    else:
        loader = setup.make_loader(timed, collator, opts.micro_batch, data_args.num_workers, shuffle=False, seed=train_args.seed)
        warm_loader = setup.make_loader(warm, collator, opts.micro_batch, data_args.num_workers, shuffle=False, seed=train_args.seed)
    model = EngineView(built.model)
    optimizer, scheduler, total_steps = setup.make_optimizer_and_schedule(accelerator, model, train_args, setup.batches_per_epoch(loader, opts.epochs))
    model, optimizer, warm_loader, loader, scheduler = accelerator.prepare(model, optimizer, warm_loader, loader, scheduler)
    setup.place_outside_engine(accelerator, model)
    ready_s = time.perf_counter() - build_start
    if accelerator.is_main_process:
        print(f"[bench] {accelerator.num_processes} process(es), ZeRO {opts.zero_stage}: built and prepared in {ready_s:.1f} s "
              f"(weights drawn on the GPU: {on_device})", flush=True)
    # No eval, checkpoints or metrics: the bench calls train_step alone.
    loop = Loop(
        Prepared(accelerator, model, optimizer, scheduler), LoopInputs(loader, None, None, built), RunFlags(model_args, data_args, train_args),
        checkpointer=None, metrics=None, state=TrainerState(), total_steps=total_steps,
    )

    def step(batch):
        loss, _, tokens, *_ = loop.train_step(batch)
        return loss, tokens, batch["input_ids"].numel()

    lengths = [timed.length(i) for i in range(n_timed)]
    result = timed_run(step, _LoopSteps(loop, warm_loader), _LoopSteps(loop, loader), lengths, opts.epochs, shape, opts.peak_tflops,
                       set_epoch=getattr(loader, "set_epoch", None))
    if world > 1:
        result = across_ranks(result, lengths, opts.epochs, shape, opts.peak_tflops)
    else:
        result.update(num_processes=1, tokens_per_s_per_gpu=result["tokens_per_s"])
    plugin = distributed.deepspeed_plugin(accelerator)
    result.update(
        mmtrain_args={"model": asdict(model_args), "data": asdict(data_args), "train": asdict(train_args)},
        collator=type(collator).__name__,
        micro_batch=None if data_args.max_tokens_per_batch else opts.micro_batch,
        max_tokens_per_batch=data_args.max_tokens_per_batch,
        zero_stage=opts.zero_stage,
        offload=opts.offload,
        gradient_checkpointing=train_args.gradient_checkpointing,
        deepspeed_config=dict(plugin.deepspeed_config) if plugin else None,
        parameter_counts=counts,
        trainable_params=sum(c["trainable"] for c in counts.values()),
        build_and_prepare_s=ready_s,
        weights_built_on_device=on_device,
        # what the LM's attention dispatches to (packed rows: the trainer's choice, mmtrain.model.attention.packed_kernel)
        lm_attention=transformers_compat.attn_implementation(built.model.language_model.config),
    )
    result["_profile_step"] = (step, loader)
    result["_keep"] = (accelerator, model, optimizer, loop)
    return result
