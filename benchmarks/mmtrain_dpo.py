"""mmtrain's side of the DPO bench: ``--objective dpo`` steps set up by the trainer's own code, timed step by step.

One process: the Accelerator of ``distributed.make_accelerator`` with Accelerate's
DeepSpeed plugin (configured through the environment ``accelerate launch --config_file
accelerate_configs/zeroN.yaml`` sets), ``setup.build_for_training``, the pairs through
the trainer's pair collator (each prompt once, ``--dpo_share_prompt``, unless that flag is
false), ``EngineView``, optimizer and schedule, ``prepare``, then
``PreferenceObjective`` with ``ReferencePolicy`` as ``mmtrain.train`` makes them, and
each step is ``Loop.train_step`` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import asdict

import torch

from dpo_pairs import pairs_for
from mmtrain_run import _LoopSteps, accelerate_environment
from timing import timed_run


def run_mmtrain(opts, model_args, data_args, train_args, batch: int) -> dict:
    """``opts.warmup`` + ``opts.steps`` of mmtrain's DPO steps at ``batch`` pairs, set up as ``mmtrain.train`` sets up a run of these arguments."""
    from mmtrain.training.distributed import prepare_environment

    prepare_environment()
    stage = None if opts.zero_stage == "none" else int(opts.zero_stage)
    os.environ.update(accelerate_environment(argparse.Namespace(zero_stage=stage, offload="none", precision="bf16")))

    from accelerate.utils import set_seed

    from mmtrain.compat import transformers as transformers_compat
    from mmtrain.model.builder import check_model_config
    from mmtrain.model.counting import count_parameters
    from mmtrain.training import distributed, setup, speedups
    from mmtrain.training.checkpoint import TrainerState
    from mmtrain.training.engine_view import EngineView, Prepared, unwrap_vlm
    from mmtrain.training.loop import Loop, LoopInputs, RunFlags
    from mmtrain.training.preference import PreferenceObjective
    from mmtrain.training.reference import ReferencePolicy, check_reference_supported

    check_model_config(model_args)
    accelerator = distributed.make_accelerator(train_args)
    check_reference_supported(accelerator, train_args)
    data_args.num_workers = distributed.loader_workers(data_args.num_workers, accelerator.device)
    set_seed(train_args.seed)
    on_gpu = accelerator.device.type == "cuda"
    with (accelerator.device if on_gpu else contextlib.nullcontext()):
        built = setup.build_for_training(accelerator, model_args, train_args, data_args)
    counts = {c.name: {"total": c.total, "trainable": c.trainable} for c in count_parameters(built.model)}
    pairs = pairs_for(opts, built, (opts.warmup + opts.steps) * batch)
    warm_set = torch.utils.data.Subset(pairs, range(opts.warmup * batch))
    timed_set = torch.utils.data.Subset(pairs, range(opts.warmup * batch, len(pairs)))
    share_prompt = speedups.shares_prompt(built, model_args, train_args, accelerator.device)
    collator = speedups.pair_collator(built.tokenizer.pad_token_id, data_args.padding_multiple(), share_prompt)
    loader = setup.make_loader(timed_set, collator, batch, data_args.num_workers, shuffle=False, seed=train_args.seed)
    warm_loader = setup.make_loader(warm_set, collator, batch, data_args.num_workers, shuffle=False, seed=train_args.seed)
    model = EngineView(built.model)
    optimizer, scheduler, total_steps = setup.make_optimizer_and_schedule(accelerator, model, train_args, [opts.warmup + opts.steps])
    model, optimizer, warm_loader, loader, scheduler = accelerator.prepare(model, optimizer, warm_loader, loader, scheduler)
    setup.place_outside_engine(accelerator, model)
    vlm = unwrap_vlm(accelerator, model)
    objective = PreferenceObjective(vlm, ReferencePolicy(vlm, engine=model), beta=train_args.dpo_beta, kind=train_args.dpo_loss, sft_weight=train_args.dpo_sft_weight)
    loop = Loop(
        Prepared(accelerator, model, optimizer, scheduler), LoopInputs(loader, None, None, built), RunFlags(model_args, data_args, train_args),
        checkpointer=None, metrics=None, state=TrainerState(), total_steps=total_steps, objective=objective,
    )

    def step(batch_):
        loss, _, tokens, *_ = loop.train_step(batch_)
        return loss, tokens, batch_["input_ids"].numel()

    lengths = [opts.tokens_per_half] * (2 * len(timed_set))
    timed = timed_run(step, _LoopSteps(loop, warm_loader), _LoopSteps(loop, loader), lengths, 1, {"params": 0, "hidden": 0, "layers": 0}, None)
    seconds = timed["seconds"]
    result = {
        "batch": batch,
        "steps": timed["steps"],
        "warmup_steps": timed["warmup_steps"],
        "seconds": seconds,
        "pairs": len(timed_set),
        "pairs_per_s": len(timed_set) / seconds,
        "tokens": timed["tokens"],
        "tokens_per_s": timed["tokens"] / seconds,
        "tokens_counted_by_loop": timed["tokens_counted_by_loop"],
        "step_s_median": timed["step_s_median"],
        "step_s_mean": timed["step_s_mean"],
        "loss_first": timed["loss_first"],
        "loss_last": timed["loss_last"],
        "trainable_params": sum(c["trainable"] for c in counts.values()),
        "parameter_counts": counts,
        "zero_stage": stage,
        "gradient_checkpointing": train_args.gradient_checkpointing,
        "torch_compile": train_args.torch_compile,
        "fused_lora": train_args.fused_lora,
        "shared_prompt": share_prompt,
        "lm_attention": transformers_compat.attn_implementation(built.model.language_model.config),
        "mmtrain_args": {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(train_args)},
    }
    for key in ("peak_allocated_bytes", "peak_allocated_gib", "peak_reserved_bytes", "static_allocated_bytes"):
        if key in timed:
            result[key] = timed[key]
    return result
