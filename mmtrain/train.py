"""Train a vision-language model: ``accelerate launch [--config_file accelerate_configs/X.yaml] mmtrain/train.py [flags]``.

Also ``python -m mmtrain.train``. With no flags it trains the embedded default: the
tiny presets on the generated shapes dataset, on CPU, in a few minutes, and prints the
held-out exact-match accuracy beside the majority-answer baseline.

The story: parse and validate flags -> Accelerator (before any weights, so ZeRO-3
partitions them as they load) -> records read and image files checked -> model -> data
-> optimizer and schedule -> prepare
-> resume -> epochs of steps, with logging, eval, checkpoints and an HF-format export
at each epoch end -> final report.
"""

from __future__ import annotations

import logging
import os
import sys

if __package__ in (None, ""):  # run as a file by `accelerate launch mmtrain/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtrain.args import ConfigError, flags_in_errors, parse_args
from mmtrain.training.distributed import close_process_group, prepare_environment

logger = logging.getLogger("mmtrain")


@flags_in_errors  # the model package speaks of config fields; a run from flags hears of flags
def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, datefmt="%H:%M:%S")
    model_args, data_args, train_args = parse_args(argv)  # every flag checked; nothing loaded yet
    prepare_environment()

    from accelerate.utils import set_seed

    from mmtrain.data import Collator, build_datasets, read_sources
    from mmtrain.data.build import check_videos_read
    from mmtrain.model.builder import check_model_config
    from mmtrain.training import distributed, init_from, reference_table, sample_record, sequence_parallel, setup, speedups
    from mmtrain.training.checkpoint import CheckpointSettings, Checkpointer, TrainerState, remove_partial_checkpoints, resolve_resume
    from mmtrain.training.engine_view import EngineView, Prepared, unwrap_vlm
    from mmtrain.training.loop import Loop, LoopInputs, RunFlags, print_final_report
    from mmtrain.training.metrics import MetricsLogger
    from mmtrain.training.preference import PreferenceObjective
    from mmtrain.training.reference import ReferencePolicy, check_reference_supported

    check_model_config(model_args)  # config files read and checked, still no weights
    init_source = init_from.check_source(train_args.init_from, model_args, train_args.init_parts) if train_args.init_from else None
    accelerator = distributed.make_accelerator(train_args)
    sequence_parallel.check_sequence_parallel(accelerator, model_args, train_args)  # process count, DeepSpeed, the LM's heads
    speedups.check_fp8(accelerator, train_args)  # float8 needs the device and ZeRO stage, known from here on
    speedups.check_quantize(accelerator, train_args)  # so does NF4
    check_reference_supported(accelerator, train_args)  # --objective dpo: what its reference's swap cannot reach
    distributed.check_same_flags(accelerator, model_args, data_args, train_args)  # machines launched apart must agree
    distributed.set_cpu_threads(accelerator)  # before any weights: presets draw them on these threads
    data_args.num_workers = distributed.loader_workers(  # -1: chosen for this device
        data_args.num_workers, accelerator.device, local_processes=distributed.local_process_count(accelerator), streaming=data_args.streaming
    )
    distributed.log_process(accelerator, data_args.num_workers)
    setup.check_output_dir(accelerator, model_args, data_args, train_args)
    setup.warn_if_lm_will_not_fit(accelerator, model_args, data_args, train_args)  # mmtrain.memory's estimate, before weights
    set_seed(train_args.seed)
    # Every record read and every image file looked up before any weights load: a bad
    # path stops the run now, not hours into an epoch.
    pairs = train_args.objective == "dpo"  # preference pairs: every record holds a chosen and a rejected answer
    sources = read_sources(data_args, seed=train_args.seed, main_process_first=accelerator.main_process_first, pairs=pairs)
    check_videos_read(sources, reads_videos=model_args.video_pool > 0)  # a video for a model without --video_pool
    speedups.check_vision_cache_size(accelerator, model_args, sources.train)  # an in-memory cache its images would outgrow

    built = setup.build_for_training(accelerator, model_args, train_args, data_args)  # the model config, made from the flags once
    if init_source:
        init_from.load_parts(built.model, init_source)  # an earlier run's trained parts, before the optimizer sees them
    shard_rank = sequence_parallel.attach(accelerator, built, train_args)  # --sequence_parallel_size: Ulysses attention
    setup.log_components(accelerator, built)
    model = EngineView(built.model)  # what DeepSpeed wraps: the frozen vision encoder stays outside

    share_prompt = speedups.shares_prompt(built, model_args, train_args, accelerator.device)  # --dpo_share_prompt: a pair's prompt computed once
    data = build_datasets(
        data_args, built.tokenizer, built.image_processor, built.image_tokens, seed=train_args.seed, sources=sources,
        rank=accelerator.process_index, world_size=accelerator.num_processes,  # --streaming: each process reads its own shards
        pairs=pairs, share_prompt=share_prompt,
    )
    setup.log_data_report(accelerator, data.report)
    pad = built.tokenizer.pad_token_id
    collator = speedups.pair_collator(pad, data_args.padding_multiple(), share_prompt) if pairs else Collator(pad, data_args.padding_multiple())
    train_collator = speedups.make_train_collator(  # packing or a budget's rows, image digests
        built, model_args, data_args, pairs=pairs, row_multiple=train_args.sequence_parallel_size, share_prompt=share_prompt
    )
    # Batches name their samples' dataset indices for --record_samples, and for --precompute_ref's table.
    train_set, train_collator = sample_record.indexed(data.train, train_collator, train_args.record_samples or train_args.precompute_ref)
    train_collator = sequence_parallel.sharding(train_collator, shard_rank, train_args.sequence_parallel_size)  # this process's columns
    train_loader = setup.make_train_loader(accelerator, train_set, train_collator, data_args, train_args)  # samples or a token budget
    eval_loader = setup.make_loader(
        *sample_record.indexed(data.eval, collator, train_args.precompute_ref),
        train_args.per_device_eval_batch_size, data_args.num_workers, shuffle=False, seed=train_args.seed,
    )

    optimizer, scheduler, total_steps = setup.make_optimizer_and_schedule(accelerator, model, train_args, setup.batches_per_epoch(train_loader, train_args.num_train_epochs))
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)
    setup.place_outside_engine(accelerator, model)

    trainable_names = [n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    prepared = Prepared(accelerator, model, optimizer, scheduler)
    checkpointer = Checkpointer(
        prepared, built.config, trainable_names,
        CheckpointSettings(train_args.output_dir, train_args.save_total_limit, seed=train_args.seed,
                           per_device_train_batch_size=train_args.per_device_train_batch_size, token_budget=data_args.token_budget(),
                           sequence_parallel_size=train_args.sequence_parallel_size),
        stream=train_loader if data_args.streaming else None,
    )
    if accelerator.is_main_process:
        for path in remove_partial_checkpoints(train_args.output_dir):
            logger.warning(f"removed a checkpoint cut off while being written: {path}")
    accelerator.wait_for_everyone()
    # The reference policy is the model as it starts: its copies are taken before a resume loads.
    objective = PreferenceObjective(
        unwrap_vlm(accelerator, model), ReferencePolicy(unwrap_vlm(accelerator, model), engine=model),
        beta=train_args.dpo_beta, kind=train_args.dpo_loss, sft_weight=train_args.dpo_sft_weight,
    ) if pairs else None
    state = TrainerState()
    resume_path = resolve_resume(train_args.output_dir, train_args.resume_from_checkpoint)
    if resume_path:
        state = checkpointer.load(resume_path)
        logger.info(f"resumed from {resume_path}: epoch {state.epoch}, step {state.global_step}, {state.step_in_epoch} batches into the epoch")
    if pairs and train_args.precompute_ref:  # the resumed checkpoint's table, or one computed now; the starting copies freed
        objective.table = checkpointer.reference_table = reference_table.load_or_compute(
            accelerator, model, objective, {"train": data.train, "eval": data.eval}, collator, resume_path,
            lambda dataset, collate: setup.make_loader(
                dataset, collate, train_args.per_device_eval_batch_size, data_args.num_workers, shuffle=False, seed=train_args.seed
            ),
        )
    if train_args.enable_tensorboard:
        accelerator.init_trackers("mmtrain")

    metrics = MetricsLogger(accelerator, train_args.output_dir, train_args.enable_tensorboard)
    loop = Loop(
        prepared, LoopInputs(train_loader, eval_loader, data, built), RunFlags(model_args, data_args, train_args),
        checkpointer=checkpointer, metrics=metrics, state=state, total_steps=total_steps, objective=objective,
    )
    result = loop.fit()

    accelerator.end_training()
    if accelerator.is_main_process:
        print_final_report(result)
    return result


def cli(argv: list[str] | None = None) -> int:
    """The console script's entry point: the exit status (0 trained, 2 a bad flag or input, 1 training stopped)."""
    from mmtrain.data import DataError
    from mmtrain.training.checkpoint import CheckpointError
    from mmtrain.training.loop import TrainingError

    try:
        main(argv)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        close_process_group()  # every process stops here, together (the loop and the checkpointer decide collectively)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
