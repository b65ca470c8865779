"""Sequence parallelism in a training run (``--sequence_parallel_size N``): checks, the LM wrapped, each row cut per process.

The pieces, in the order a run meets them:

* :func:`check_sequence_parallel`, once the Accelerator exists and before any weights
  load: a DeepSpeed config, a process count N divides, an LM whose heads N divides and
  whose attention can be split (:func:`mmtrain.model.sequence_parallel.split_problem`);
* the builder switches the LM to a varlen kernel (``speedups.packed_attention``) and
  :func:`attach` wraps it in DeepSpeed's Ulysses attention (groups of N consecutive
  processes);
* the training loader repeats each micro-batch N times (:class:`mmtrain.data.sequence_shard.GroupedBatches`), so a
  group's processes take the same rows, and its collator cuts each row to the process's
  columns (:class:`ShardingCollator`).

Why the loss and gradients need nothing more: each process's loss covers the targets of
its own columns, and the loop counts each process's answer tokens and sums them over all
processes (:mod:`mmtrain.training.weighting`), so every answer token of the step is counted
once and the step's loss is one mean over them. The gradients of one row are the sum of
its processes' (the all-to-all's backward returns each position's gradient to the process
that holds it), and DeepSpeed averages over all processes, which the weighting's factor of
``processes`` undoes exactly as it does for data parallelism. DeepSpeed is not told about
the groups (no ``mpu``): it then reduces and partitions over every process, as ZeRO-1/2/3
already do.

Why not Accelerate's ``parallelism_config`` (``sp_backend: deepspeed``): its ``prepare``
wraps the training loader in DeepSpeed's ``UlyssesSPDataLoaderAdapter``, which cuts every
tensor of a batch along dimension 1, and a VLM batch's images (``[N, 3, H, W]``), label
positions and segment offsets are not laid out that way; it also asks for the whole row on
one process first. The attention it registers is the same one :func:`attach` registers.

Images: every process of a group encodes the whole row's images and embeds the whole row,
then keeps its columns. The vision tower's forward (frozen: no activations kept) then runs
N times. For ref-7b's 8 images on CLIP ViT-L/14-336 (0.30 B parameters, 577 tokens each)
that is 2 x 0.30e9 x 577 x 8 = 2.8 TFLOP per process, against the LM's share of a
32k-token row with LoRA, (4 x 6.7e9 x 32768 + 3 x 2 x 32768^2 x 4096 x 32) / 2 = 0.86 PFLOP
per process at N = 2: 0.3%. Encoding each image once and sending its features to the
processes that hold its positions would save that 0.3% for a collective per micro-batch
and a second path through the projector; the trainable projector runs on every image
on every process either way (its activations are not divided by N).

Evaluation runs whole rows on each process (the eval loader is not grouped; Ulysses steps
aside in eval mode), as data parallelism does.
"""

from __future__ import annotations

import logging

from mmtrain.args import ConfigError
from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.data.sequence_shard import ShardingCollator
from mmtrain.model import sequence_parallel
from mmtrain.model.builder import BuiltModel, language_config
from mmtrain.training import distributed

logger = logging.getLogger("mmtrain")

def check_sequence_parallel(accelerator, model_args, train_args) -> None:
    """Refuse ``--sequence_parallel_size`` where it cannot run, naming the flag; from configs alone (no weights)."""
    size = train_args.sequence_parallel_size
    if size == 1:
        return
    flag = f"--sequence_parallel_size {size}"
    if distributed.deepspeed_plugin(accelerator) is None:
        raise ConfigError(
            f"{flag} runs through DeepSpeed's Ulysses attention: launch with a DeepSpeed Accelerate config "
            "(e.g. accelerate launch --config_file accelerate_configs/sp2_zero3.yaml)"
        )
    if problem := deepspeed_compat.ulysses_problem():
        raise ConfigError(f"{flag}: {problem}")
    processes = accelerator.num_processes
    if processes % size:
        raise ConfigError(f"{flag}: the run has {processes} processes, which groups of {size} cannot share; launch a multiple of {size}")
    problem = sequence_parallel.split_problem(language_config(model_args), size, mmca=model_args.enable_mmca_attention)
    if problem:
        raise ConfigError(f"{flag} cannot split this LM: {problem}")


def attach(accelerator, built: BuiltModel, train_args) -> int | None:
    """Wrap the built LM's attention in Ulysses; returns this process's rank in its group (None without sequence parallelism)."""
    size = train_args.sequence_parallel_size
    if size == 1:
        return None
    _, rank = sequence_parallel.enable_sequence_parallel(built.model.language_model, size, micro_batch=1)
    if rank != accelerator.process_index % size:  # GroupedBatches hands a group's processes the same rows
        raise RuntimeError(f"process {accelerator.process_index} is rank {rank} of its sequence-parallel group, expected consecutive groups")
    if accelerator.is_main_process:
        groups = accelerator.num_processes // size
        logger.info(f"sequence parallelism: {groups} group(s) of {size} processes; each micro-batch's row is split {size} ways")
    return rank


def sharding(collator, rank: int | None, size: int):
    """The training collator, cutting each row to this process's columns (as it is without sequence parallelism)."""
    return collator if rank is None else ShardingCollator(collator, rank, size)
