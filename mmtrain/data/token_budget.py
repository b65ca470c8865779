"""Micro-batches by token budget: as many whole samples as fit in ``--max_tokens_per_batch``.

:class:`TokenBudgetBatchSampler` is the DataLoader's batch sampler under a budget. Each
epoch it plans every micro-batch from the items' sizes alone (tokens with image tokens
counted, and images), which the dataset knows without encoding anything:

1. the items are shuffled with ``seed`` and the epoch (the same permutation on every
   process and after a resume: the plan is a function of the seed and the epoch);
2. a window of the next ``window`` items of that order is kept; each micro-batch starts
   with the window's *oldest* item and then takes, in shuffled order, every other item
   of the window that still fits both budgets (first fit);
3. the finished micro-batches are shuffled once more.

Why this keeps the shuffle honest: the data is never ordered by length. Step 2 only
lets a short item overtake a long one by at most ``window`` items, and the oldest item
always leaves first, so no item waits for more than ``window`` micro-batches; step 3
removes what is left of the window's drift (long items otherwise gather at the end of
an epoch). Every item is used exactly once per epoch.

The :class:`~mmtrain.data.packing.PackingCollator` then packs each micro-batch into one
row of at most ``max_tokens`` tokens: per-sample positions, attention that never
crosses samples.
"""

from __future__ import annotations

from collections import deque

import numpy as np

WINDOW = 256  # items a micro-batch may be filled from: a full budget without a length sort


def plan_batches(sizes: list[tuple[int, int]], max_tokens: int, max_images: int | None, rng: np.random.Generator, window: int = WINDOW) -> list[list[int]]:
    """Indices of ``sizes`` (``(tokens, images)`` each) grouped into micro-batches within both budgets.

    Every item must fit on its own (the dataset drops or truncates those that do not).
    """
    image_budget = max_images if max_images is not None else float("inf")
    for i, (tokens, images) in enumerate(sizes):
        if tokens > max_tokens or images > image_budget:
            raise ValueError(f"item {i} ({tokens} tokens, {images} images) exceeds the budget of {max_tokens} tokens, {max_images} images")
    pending = deque(int(i) for i in rng.permutation(len(sizes)))
    waiting: list[int] = []
    batches: list[list[int]] = []
    while pending or waiting:
        while pending and len(waiting) < window:
            waiting.append(pending.popleft())
        batch = [waiting[0]]
        tokens, images = sizes[waiting[0]]
        rest = []
        for i in waiting[1:]:
            t, n = sizes[i]
            if tokens + t <= max_tokens and images + n <= image_budget:
                batch.append(i)
                tokens, images = tokens + t, images + n
            else:
                rest.append(i)
        waiting = rest
        batches.append(batch)
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


class TokenBudgetBatchSampler:
    """Yields lists of dataset indices, one micro-batch each, planned per epoch (see the module docstring).

    The epoch is the dataset's (``dataset.set_epoch``, which the loop calls before each
    epoch), so DataLoader workers and Accelerate's sharding need not forward it; the
    length is the current epoch's number of micro-batches.
    """

    batch_size = None  # micro-batches of varying sample counts (how Accelerate's sharding reads it)
    drop_last = False

    def __init__(self, dataset, max_tokens: int, max_images: int | None, seed: int, window: int = WINDOW):
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.max_images = max_images
        self.seed = seed
        self.window = window
        self._plans: dict[int, list[list[int]]] = {}

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """The micro-batches of ``epoch`` (default: the dataset's current epoch)."""
        current = self.dataset.epoch
        epoch = current if epoch is None else epoch
        if epoch not in self._plans:
            if epoch != current:
                self.dataset.set_epoch(epoch)  # joined items are regrouped per epoch: their sizes with them
            sizes = self.dataset.item_sizes()
            if epoch != current:
                self.dataset.set_epoch(current)
            rng = np.random.default_rng([self.seed, epoch, 0xB0D6E7])
            self._plans[epoch] = plan_batches(sizes, self.max_tokens, self.max_images, rng, self.window)
        return self._plans[epoch]

    def __iter__(self):
        yield from (list(batch) for batch in self.plan())

    def __len__(self) -> int:
        return len(self.plan())
