"""The token-weighted loss: one mean over every answer token of an optimizer step.

Micro-batches hold different numbers of answer tokens (a token budget's by design, a
sample count's whenever answers differ in length), so the mean of per-micro-batch means
would weigh a token of a sparse micro-batch more than one of a dense micro-batch, and
what is trained would change with the batching flags. Every step's loss is instead the
sum of its token losses over every micro-batch of every process, divided by the count of
those tokens, whatever sizes the batches: ``--per_device_train_batch_size``,
``--max_tokens_per_batch``, any gradient accumulation and process count, in memory or
streamed (the objective ``num_items_in_batch`` gives transformers' Trainer).

How the count is known before the first backward: the loop reads a step's micro-batches
ahead (they are on hand: the loader has made them) and counts their label tokens from
the ``label_positions`` the collator computed on the CPU, so the count costs no read
back from the GPU. One all-reduce per optimizer step sums it over processes; it stays a
device tensor that the losses are divided by. A stream's loader sums it in the one
exchange per step in which its processes agree on the step's micro-batches
(:meth:`mmtrain.training.stream_loader.StreamLoader.windows`). (The alternative, an
all-reduce of each micro-batch's count and a rescaling of the gradients at the step,
would need the gradients in hand, which DeepSpeed keeps partitioned inside its engine.)

What each backward gets: Accelerate divides every loss by the accumulation steps (and
DeepSpeed does the same inside ``backward``), and the data-parallel gradient reduction
averages over processes. A micro-batch's loss is therefore its token-loss sum times
``processes * accumulation`` over the step's count, so that after both divisions the
gradient is exactly that of the step's token mean. The last step of an epoch may hold
fewer micro-batches; the same factor is right there too, since both divisions still use
the configured accumulation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from mmtrain.batch import IGNORE_INDEX


def step_groups(loader: Iterable, accumulation: int) -> Iterator[list]:
    """The loader's micro-batches grouped by optimizer step (an epoch's last group may be shorter)."""
    batches = iter(loader)
    while group := list(itertools.islice(batches, accumulation)):
        yield group


def label_tokens(batch: dict) -> int:
    """Answer tokens of a batch, from its shapes alone when the collator gave ``label_positions``."""
    positions = batch.get("label_positions")
    if positions is not None:
        return positions.numel()
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def step_label_tokens(accelerator, group: list[dict], count=label_tokens) -> torch.Tensor:
    """Answer tokens of one optimizer step summed over every process (a device tensor, not read back).

    ``count``: another unit a step's loss is a mean over (a preference objective's pairs).
    """
    local = torch.tensor(float(sum(count(batch) for batch in group)), device=accelerator.device)
    return accelerator.reduce(local, "sum")


def weighted_loss(loss: torch.Tensor, num_label_tokens: torch.Tensor, step_tokens: torch.Tensor, accelerator) -> torch.Tensor:
    """A micro-batch's loss (its mean over ``num_label_tokens``) rescaled to its share of the step's token mean."""
    factor = accelerator.num_processes * accelerator.gradient_accumulation_steps
    return loss * num_label_tokens * factor / step_tokens.clamp(min=1)
