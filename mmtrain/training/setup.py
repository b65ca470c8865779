"""Set-up steps of a training run, each named for what it does."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from mmtrain.args import ConfigError, component_settings
from mmtrain.data.dataset import DropBadItems
from mmtrain.data.sequence_shard import EpochShuffledBatches, GroupedBatches
from mmtrain.data.token_budget import TokenBudgetBatchSampler
from mmtrain.model.builder import BuiltModel, build_model
from mmtrain.model.counting import budget_from_counts, count_parameters, format_table
from mmtrain.training import distributed, speedups
from mmtrain.training.checkpoint import CHECKPOINT_DIR, list_checkpoints
from mmtrain.training.engine_view import EngineView
from mmtrain.training.metrics import METRICS_FILE
from mmtrain.training.sample_record import SAMPLES_DIR
from mmtrain.training.stream_loader import StreamLoader
from mmtrain.training.optim import build_scheduler, param_groups, warmup_steps

logger = logging.getLogger("mmtrain")

RUN_CONFIG = "run_config.json"
TENSORBOARD_DIR = "tensorboard"
_EXPORT_RE = re.compile(r"^epoch-\d+$")


def run_outputs(output_dir: str) -> list[str]:
    """What a run wrote into ``output_dir``: checkpoints, ``epoch-N`` exports, metrics, TensorBoard logs, its flags, sample records.

    Matched by name, so that files a user put there are never taken for the run's.
    """
    if not os.path.isdir(output_dir):
        return []
    known = {CHECKPOINT_DIR, METRICS_FILE, METRICS_FILE + ".tmp", TENSORBOARD_DIR, RUN_CONFIG, SAMPLES_DIR}
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name in known or (_EXPORT_RE.match(name) and os.path.isdir(path)):
            found.append(path)
    return found


def remove_run_outputs(output_dir: str) -> list[str]:
    """Delete :func:`run_outputs` (``--overwrite_output_dir``): an old ``epoch-N`` left beside a new run could be loaded for it."""
    removed = run_outputs(output_dir)
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed


def check_output_dir(accelerator, model_args, data_args, train_args) -> None:
    """Refuse to mix two runs in one folder; record this run's flags."""
    out = train_args.output_dir
    path = os.path.join(out, RUN_CONFIG)
    if os.path.isfile(path) and not train_args.overwrite_output_dir:
        with open(path) as f:
            previous = json.load(f)
        diffs = model_args.differences(previous.get("model", {}))
        if diffs:
            raise ConfigError(
                f"--output_dir {out!r} holds a run of a different model ({'; '.join(diffs)}); "
                "pick another --output_dir or pass --overwrite_output_dir",
                fields=tuple(model_args.identity()),  # the settings that differ, named as flags by the command line
            )
        if list_checkpoints(out) and train_args.resume_from_checkpoint is None:
            raise ConfigError(
                f"--output_dir {out!r} already holds checkpoints of this run; pass --resume_from_checkpoint latest to "
                "continue it, or --overwrite_output_dir to start over"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if train_args.overwrite_output_dir and train_args.resume_from_checkpoint is None:
            removed = remove_run_outputs(out)
            if removed:
                logger.info(f"--overwrite_output_dir: removed the earlier run's {', '.join(os.path.basename(p) for p in removed)} from {out}")
        os.makedirs(out, exist_ok=True)
        with open(path, "w") as f:
            record = {
                "model": model_args.identity(),
                "model_config": model_args.model_config().to_dict(),
                "model_args": asdict(model_args),
                "data_args": asdict(data_args),
                "train_args": asdict(train_args),
            }
            json.dump(record, f, indent=2)
    accelerator.wait_for_everyone()


def build_for_training(accelerator, model_args, train_args, data_args) -> BuiltModel:
    """Build the model from its config in the dtypes training wants, with this machine's speed options."""
    compute = distributed.compute_dtype(accelerator)
    deepspeed = distributed.deepspeed_plugin(accelerator) is not None
    # DeepSpeed keeps its own fp32 master copy, so its module is all compute dtype. Plain
    # mixed precision keeps trainable weights in fp32 and autocasts; frozen ones are
    # stored in the compute dtype either way (half the memory, same numbers).
    frozen_dtype = compute if (deepspeed or accelerator.device.type == "cuda") else torch.float32
    trainable_dtype = compute if deepspeed else torch.float32
    # Presets draw their random weights where they will train: at ZeRO 0-2 on the GPU
    # (seconds for 7B, where the launcher's one CPU thread per process took minutes);
    # at ZeRO-3 zero.Init places them.
    # With a 4-bit base they are drawn on the CPU, as a checkpoint folder is read, and each
    # frozen Linear reaches the GPU as its 4-bit codes: the full-precision LM would not fit
    # the GPUs a 4-bit base is for.
    on_gpu = accelerator.device.type == "cuda" and distributed.zero_stage(accelerator) != 3 and train_args.quantize_base != "nf4"
    built = build_model(
        model_args.model_config(),
        speed=speedups.speed_options(accelerator, train_args, data_args),
        dtype=frozen_dtype,
        trainable_dtype=trainable_dtype,
        frozen_vision_context=distributed.frozen_vision_context(accelerator),
        preset_device=accelerator.device if on_gpu else None,
    )
    built.model.language_model.config.use_cache = False
    speedups.zero3_leaf_layers(accelerator, built)
    return built


def warn_if_lm_will_not_fit(accelerator, model_args, data_args, train_args) -> None:
    """Before any weights load: a full-LM run that ``mmtrain.memory`` predicts will not fit this GPU is warned about."""
    if not (model_args.lm_weights_train and accelerator.device.type == "cuda" and accelerator.is_main_process):
        return
    from mmtrain.memory import fit_warning

    setup = memory_setup(accelerator, data_args, train_args)
    warning = fit_warning(model_args, setup, torch.cuda.get_device_properties(accelerator.device).total_memory)
    if warning:
        logger.warning(f"--lm_training {model_args.lm_mode}: {warning}")


def memory_setup(accelerator, data_args, train_args):
    """This run as ``mmtrain.memory`` models it: its ZeRO stage, offload, GPUs, precision and largest micro-batch.

    A token budget's largest micro-batch is one packed row of the whole budget; otherwise
    ``--per_device_train_batch_size`` samples of ``--max_seq_len`` tokens.
    """
    from mmtrain.memory import MemorySetup, largest_micro_batch

    plugin = distributed.deepspeed_plugin(accelerator)
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in (None, "none")
    offload = "optimizer+params" if offload_param else ("optimizer" if distributed.offloads_optimizer(accelerator) else "none")
    micro_batch, seq_len = largest_micro_batch(train_args.per_device_train_batch_size, data_args.max_seq_len, data_args.max_tokens_per_batch)
    return MemorySetup(
        zero_stage=max(distributed.zero_stage(accelerator), 0),
        offload=offload,
        num_gpus=accelerator.num_processes,
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=_precision(accelerator),
        gradient_checkpointing=train_args.gradient_checkpointing,
        sequence_parallel=train_args.sequence_parallel_size,
        compiled=speedups.compiles(accelerator.device, train_args),
        fp8_base=train_args.fp8_base,
        fp8_vision=train_args.fp8_vision,
        nf4_base=train_args.quantize_base == "nf4",
        nf4_vision=train_args.quantize_vision == "nf4",
        preference_pairs=train_args.objective == "dpo",
        precompute_ref=train_args.precompute_ref,
    )


def log_components(accelerator, built: BuiltModel) -> None:
    """Say what is frozen and what trains, with the budget's numbers."""
    if not accelerator.is_main_process:
        return
    counts = count_parameters(built.model)
    lines = [f"model components (language model: {_lm_training(built.config)}):"]
    for c in counts:
        if c.total == 0:
            continue
        status = "trainable" if c.trainable == c.total else ("frozen" if c.trainable == 0 else "partly trainable")
        lines.append(f"  {c.name:<22} {c.total:>14,} params  {status}" + (f" ({c.trainable:,} train)" if status == "partly trainable" else ""))
    for where, targets in built.lora_targets.items():
        kinds = sorted({t.rsplit(".", 1)[-1] for t in targets})
        lines.append(f"  LoRA on {where}: {len(targets)} Linear layers ({', '.join(kinds)})")
    if not built.model.vision_trainable:
        lines.append("  vision encoder runs outside the optimizer/ZeRO engine, under no_grad")
    lines.append(format_table(budget_from_counts(counts, _precision(accelerator))))
    logger.info("\n".join(lines))


def _lm_training(config) -> str:
    mode = config.lm_mode
    what = {
        "frozen": "frozen",
        "lora": f"LoRA rank {config.lang_lora_dim}",
        "full": "every weight trains",
        "last_layers": f"the last {config.lm_trainable_layers} decoder layers train",
    }[mode]
    extras = [name for name, on in (("embedding table", config.train_full_embeddings), ("output head", config.train_lm_head)) if on]
    return what + (f", {' and '.join(extras)} trained" if extras and mode != "full" else "")


def _precision(accelerator) -> str:
    return {"bf16": "bf16", "fp16": "fp16"}.get(accelerator.mixed_precision, "fp32")


def log_data_report(accelerator, report: dict) -> None:
    if accelerator.is_main_process:
        logger.info("data: " + json.dumps(report, default=str))


def _dropping_bad_items(dataset, collator):
    """The collator, taking out of each batch the items the dataset dropped (``--on_bad_sample skip``)."""
    placeholder = getattr(dataset, "placeholder_item", None)
    return DropBadItems(collator, placeholder) if placeholder is not None else collator


def make_loader(dataset, collator, batch_size: int, num_workers: int, *, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=_dropping_bad_items(dataset, collator),
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def make_train_loader(accelerator, dataset, collator, data_args, train_args) -> DataLoader:
    """The shuffled training loader: ``--per_device_train_batch_size`` samples, or a token budget's micro-batches, or a stream's."""
    if data_args.max_tokens_per_batch:
        plugin = distributed.deepspeed_plugin(accelerator)
        if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
            # DeepSpeed wants a fixed micro-batch size, which it uses only to report throughput
            # and check train_batch_size: a budget's micro-batch is one packed row.
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    if data_args.streaming:
        budget = (data_args.max_tokens_per_batch, data_args.max_images_per_batch) if data_args.max_tokens_per_batch else None
        return StreamLoader(
            accelerator, dataset, collator, train_args.per_device_train_batch_size, train_args.record_samples, data_args.num_workers, budget
        )
    group = train_args.sequence_parallel_size
    if not data_args.max_tokens_per_batch and group == 1:
        return make_loader(dataset, collator, train_args.per_device_train_batch_size, data_args.num_workers, shuffle=True, seed=train_args.seed)
    if data_args.max_tokens_per_batch:
        sampler = TokenBudgetBatchSampler(dataset, data_args.max_tokens_per_batch, data_args.max_images_per_batch, train_args.seed)
    else:
        sampler = EpochShuffledBatches(dataset, train_args.per_device_train_batch_size, train_args.seed)
    if group > 1:
        # The processes of a sequence-parallel group take the same micro-batches (mmtrain/data/sequence_shard.py).
        sampler = GroupedBatches(sampler, group)
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=_dropping_bad_items(dataset, collator), num_workers=data_args.num_workers,
        persistent_workers=data_args.num_workers > 0,
    )


def batches_per_epoch(loader: DataLoader, epochs: int) -> list[int] | None:
    """Micro-batches of each epoch before sharding: a token budget plans a different number every epoch; a stream's are unknown (None)."""
    if isinstance(loader, StreamLoader):
        return None
    sampler = loader.batch_sampler
    repeats = sampler.size if isinstance(sampler, GroupedBatches) else 1  # a sequence-parallel group's copies
    sampler = sampler.batches if isinstance(sampler, GroupedBatches) else sampler
    if isinstance(sampler, TokenBudgetBatchSampler):
        return [repeats * len(sampler.plan(epoch)) for epoch in range(epochs)]
    dataset = loader.dataset
    if not hasattr(dataset, "set_epoch"):
        return [len(loader)] * epochs
    # Concatenated samples are regrouped every epoch, each epoch its own count of them.
    current, counts = dataset.epoch, []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        counts.append(len(loader))
    dataset.set_epoch(current)
    return counts


def make_optimizer_and_schedule(accelerator, model, train_args, batches_per_epoch: list[int] | None):
    """AdamW over the seed's four parameter groups and any per-component ones, and the schedule over all optimizer
    steps (``--max_steps`` for a stream)."""
    groups = param_groups(
        model,
        weight_decay=train_args.weight_decay,
        learning_rate=train_args.learning_rate,
        embed_learning_rate=train_args.learning_rate_pretraining_components,
        components=component_settings(train_args),
    )
    optimizer = distributed.make_optimizer(
        accelerator, groups, train_args.learning_rate, betas=(train_args.adam_beta1, train_args.adam_beta2), eps=train_args.adam_epsilon
    )
    # batches_per_epoch is before sharding; every process sees 1/num_processes of them.
    if batches_per_epoch is None:  # a stream: its length is known only at its end
        per_epoch, steps_per_epoch = [train_args.max_steps], "unknown: streamed"
    else:
        per_epoch = [math.ceil(math.ceil(n / accelerator.num_processes) / accelerator.gradient_accumulation_steps) for n in batches_per_epoch]
        steps_per_epoch = per_epoch[0] if len(set(per_epoch)) == 1 else f"{min(per_epoch)}-{max(per_epoch)}"
    total = sum(per_epoch)
    if train_args.max_steps > 0:
        total = min(total, train_args.max_steps)
    if total < 1:
        raise ConfigError("the training set yields no optimizer step; add data or lower --per_device_train_batch_size")
    scheduler = build_scheduler(optimizer, train_args.lr_scheduler_type, train_args.num_warmup_steps, total)
    if accelerator.is_main_process:
        logger.info(
            f"optimizer: {len(groups)} groups ({', '.join(_describe_group(g) for g in groups)}); "
            f"{total} steps ({steps_per_epoch}/epoch), warmup {warmup_steps(train_args.num_warmup_steps, total)}, "
            f"schedule {train_args.lr_scheduler_type}, clipping {distributed.max_grad_norm(accelerator, train_args)}, "
            f"AdamW betas ({train_args.adam_beta1:g}, {train_args.adam_beta2:g}) eps {train_args.adam_epsilon:g}"
        )
    return optimizer, scheduler, total


def _describe_group(group: dict) -> str:
    return f"{group['name']}: {len(group['params'])} tensors, lr {group.get('initial_lr', group['lr']):g}, wd {group['weight_decay']:g}"


def place_outside_engine(accelerator, model) -> None:
    """After ``prepare``: put the parts outside the engine (a frozen encoder) on this process's device.

    At ZeRO-3 the engine moves parameters but not buffers: a module built outside
    ``zero.Init`` (the projector's tables, any user module) would keep its buffers on
    the CPU and fail at its first forward on a GPU. They are moved here too.
    """
    view: EngineView = accelerator.unwrap_model(model)
    dtype = distributed.compute_dtype(accelerator) if accelerator.device.type == "cuda" or distributed.deepspeed_plugin(accelerator) else torch.float32
    view.place_outside(accelerator.device, dtype)
    if distributed.zero_stage(accelerator) == 3:
        moved = place_buffers(view.vlm, accelerator.device)
        if moved:
            logger.info(f"ZeRO-3: moved {len(moved)} buffers the engine left off {accelerator.device} ({', '.join(moved[:4])}{', ...' if len(moved) > 4 else ''})")


def place_buffers(module: torch.nn.Module, device: torch.device) -> list[str]:
    """Move every buffer of ``module`` not on ``device`` there; returns their names.

    Assigning a tensor to a buffer's name replaces the buffer and keeps whether it is
    saved in the state dict.
    """
    moved = []
    for prefix, owner in module.named_modules():
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != device:
                setattr(owner, name, buffer.to(device))
                moved.append(f"{prefix}.{name}" if prefix else name)
    return moved
