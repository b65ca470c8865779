"""Sequence parallelism's data side: one row split across the processes of a group.

Under ``--sequence_parallel_size N`` the N processes of a group train on the same
micro-batch, each computing the LM on one of N equal, consecutive column ranges of its
row(s) (DeepSpeed's Ulysses attention exchanges heads for positions inside each attention
layer). Two pieces make that happen before the model sees a batch:

* :class:`GroupedBatches` repeats each micro-batch of a batch sampler N times in a row.
  Accelerate hands batch ``i`` to process ``i % processes``, and a group is N consecutive
  processes, so the processes of one group receive the same micro-batches and the groups
  share the data as N-fold fewer processes would. Every count derived from the loader's
  length (steps per epoch, the schedule) is therefore already per group.
* :func:`shard_batch` (run in the loader's workers by :class:`ShardingCollator`) cuts the
  batch's targets, positions and attention mask to this process's columns. It keeps the
  whole row's ``input_ids``, images and segment offsets: every process embeds the whole
  row, images included, and keeps its own columns of the embeddings (see
  :mod:`mmtrain.batch`, key ``sequence_shard``, for what each key then holds).

The targets are shifted before the cut: the last column of one process predicts the
first token of the next process's columns, so each process is given the targets of its
own columns (``labels[:, 1:]`` of the whole row, padded with one ignored column), and the
answer tokens of a row are the union of its processes' targets, each counted once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mmtrain.batch import IGNORE_INDEX, BatchCollator


class GroupedBatches:
    """A batch sampler whose every micro-batch comes ``size`` times in a row (one per process of a group).

    ``batches`` is any batch sampler (lists of dataset indices); its ``batch_size`` is
    reported as None, so Accelerate's sharding hands out whole micro-batches in order and,
    where it completes the last round from the first batches, takes them in the same
    repeated order.
    """

    batch_size = None

    def __init__(self, batches, size: int):
        if size < 1:
            raise ValueError(f"a sequence-parallel group has >= 1 processes, got {size}")
        self.batches = batches
        self.size = size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            for _ in range(self.size):
                yield batch

    def __len__(self) -> int:
        return len(self.batches) * self.size


class EpochShuffledBatches:
    """Micro-batches of ``batch_size`` indices of a shuffled ``length``-item dataset, a new order each epoch from the seed.

    The epoch is read from ``dataset.epoch`` (the loop sets it before each epoch), so every
    process of a run, and a resumed run, draws the same order for the same epoch.
    """

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1000003 + getattr(self.dataset, "epoch", 0))
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)


def shard_batch(batch: dict, rank: int, size: int) -> dict:
    """``batch`` with its targets, positions and attention mask cut to columns ``rank`` of ``size`` equal parts.

    The row length must be a multiple of ``size`` (the collator pads to it). Rows without
    ``position_ids`` (one sample per row) get ``0 .. L-1``: the attention of every process
    then sees each token's place in the whole row.
    """
    input_ids = batch["input_ids"]
    rows, length = input_ids.shape
    if length % size:
        raise ValueError(f"a row of {length} tokens cannot be split in {size} equal parts; pad rows to a multiple of {size}")
    if batch.get("label_samples") is not None:
        raise ValueError("rows of preference pairs (label_samples) cannot be split: each pair's log-probability needs the whole row")
    width = length // size
    columns = slice(rank * width, (rank + 1) * width)
    targets = torch.cat([batch["labels"][:, 1:], torch.full((rows, 1), IGNORE_INDEX, dtype=batch["labels"].dtype)], dim=1)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(length).expand(rows, length)
    local_targets = targets[:, columns].contiguous()
    return {
        **batch,
        "labels": local_targets,
        "label_positions": (local_targets != IGNORE_INDEX).flatten().nonzero().flatten(),
        "attention_mask": batch["attention_mask"][:, columns].contiguous(),
        "position_ids": positions[:, columns].contiguous(),
        "sequence_shard": (rank, size),
    }


class ShardingCollator(BatchCollator):
    """A collator whose batches are cut to one process's columns (:func:`shard_batch`)."""

    def __init__(self, collator, rank: int, size: int):
        self.collator = collator
        self.rank = rank
        self.size = size
        self.output_keys = (*getattr(collator, "output_keys", ()), "sequence_shard")

    def __call__(self, items: list[dict]) -> dict:
        return shard_batch(self.collator(items), self.rank, self.size)
