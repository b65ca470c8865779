"""The training loader of a ``--streaming`` run: batches from each process's own part of the shards.

Accelerate's prepared loader cannot be used here: for an iterable dataset it either
reads everything on the main process and sends it out, or has every process read the
whole stream and keep every P-th batch. Each process reads its own part instead
(:class:`mmtrain.data.streaming.ShardStream`), and the processes agree before every
micro-batch that all of them have one, so that a process whose part ran out first ends
the epoch for all instead of leaving the others waiting in a collective.

With ``--num_workers W`` the process's part is split once more, into W worker parts
(:meth:`ShardStream.part`), each read, encoded (images included) and collated in a
torch DataLoader worker with its own shuffle buffer. torch hands out the workers'
batches strictly in turn (worker 0, 1, ..., W-1, 0, ...), and a worker whose part has
ended keeps answering with an empty marker instead of stopping, so the turn never
changes: the order is a function of the seed, the epoch and the process and worker
counts. Every batch carries its worker part's position after it, so the loader knows,
at each batch it hands out, where every part stands and whose turn is next; that is the
checkpoint's state. (The position holds the part's buffered records as text, so each batch
brings a few hundred KB of it from its worker with a buffer of a thousand LLaVA records;
images are never in it.) A resume starts the workers at that turn (DataLoader worker ``i``
reads part ``(next + i) mod W``) and each part from its position; batches the workers
had prefetched past the checkpoint are made again. This is done here rather than with
torchdata's StatefulDataLoader, which would add a dependency the GPU image lacks, and
whose saved worker states would still need the buffer contents that only
:meth:`ShardStream.state_dict` holds.

With ``--max_tokens_per_batch`` a micro-batch is filled greedily from the stream's
output: whole samples in the order they come, tokens counted with image tokens (and
images within ``--max_images_per_batch``), until the next one would not fit; that one is
handed back to the stream (:meth:`ShardStream.hold_back`), which keeps it in its saved
state, and opens the next micro-batch. The train collator then packs each micro-batch
into one row, as for a budget in memory. Unlike the in-memory plan there is no window
for a short sample to overtake a long one, so micro-batches fill a little less fully.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from accelerate.utils import send_to_device

from mmtrain.data.formats import DataError
from mmtrain.data.preference import PAIR_TOKENS
from mmtrain.data.streaming import ShardStream
from mmtrain.training.sample_record import INDICES_KEY


def images_in(item: dict) -> int:
    """Images of an encoded item, each video frame counted as one (with AnyRes tiles its pixel rows are tiles; its sizes count the images)."""
    images = len(item["image_sizes"]) if "image_sizes" in item else item["pixel_values"].shape[0]
    return images + (item["pixel_values_videos"].shape[0] if "pixel_values_videos" in item else 0)


def take_batch(stream: ShardStream, batch_size: int, budget: tuple[int, int | None] | None) -> list[tuple[str, dict]]:
    """The next micro-batch's ``(id, item)`` pairs: ``batch_size`` of them, or under a ``(tokens, images)`` budget as many as fit.

    Every item fits a budget on its own: the dataset drops or truncates longer ones.
    """
    pairs, tokens, images = [], 0, 0
    while budget is not None or len(pairs) < batch_size:
        pair = stream.next_item()
        if pair is None:
            break
        if budget is not None:
            more_tokens, more_images = pair[1].get(PAIR_TOKENS, len(pair[1]["input_ids"])), images_in(pair[1])
            if pairs and (tokens + more_tokens > budget[0] or (budget[1] is not None and images + more_images > budget[1])):
                stream.hold_back()
                break
            tokens, images = tokens + more_tokens, images + more_images
        pairs.append(pair)
    return pairs


class _WorkerParts(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its part's batches, each with the part's position after it, then end markers."""

    def __init__(self, stream: ShardStream, collator, batch_size: int, budget, num_workers: int, first_part: int, states: list):
        self.stream, self.collator, self.batch_size, self.budget = stream, collator, batch_size, budget
        self.num_workers, self.first_part, self.states = num_workers, first_part, states

    def __iter__(self):
        index = (self.first_part + torch.utils.data.get_worker_info().id) % self.num_workers
        stream = self.stream.part(index, self.num_workers)
        if self.states[index] is not None:
            stream.load_state_dict(self.states[index])
        stream.start()
        while True:
            pairs = take_batch(stream, self.batch_size, self.budget)
            batch = self.collator([item for _, item in pairs]) if pairs else None
            yield {"part": index, "ids": [i for i, _ in pairs], "batch": batch, "state": stream.state_dict()}


class StreamLoader:
    """Micro-batches of ``batch_size`` items from ``stream``, or as many as fit ``budget`` (tokens, images), on this process's device.

    ``exhausted`` says whether the iteration has reached the end of its epoch (known from
    the epoch's last window on, before that window trains);
    ``state_dict`` is the stream's position after the last batch handed out (with
    workers: every worker part's, and whose turn is next).
    """

    def __init__(
        self, accelerator, stream: ShardStream, collator, batch_size: int, record_samples: bool, num_workers: int = 0,
        budget: tuple[int, int | None] | None = None,
    ):
        self.accelerator = accelerator
        self.stream = stream
        self.collator = collator
        self.batch_size = batch_size
        self.budget = budget
        self.record_samples = record_samples
        self.num_workers = num_workers
        self.exhausted = False
        self.batches_last_epoch: int | None = None
        self._parts: dict | None = None  # with workers: the state of the epoch in progress
        self._restored: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        """The epoch's micro-batches one by one (the processes agree before each)."""
        for window, _ in self.windows(1, lambda batch: 0):
            yield from window

    def windows(self, size: int, weigh: Callable[[dict], float]) -> Iterator[tuple[list[dict], float]]:
        """The epoch's micro-batches ``size`` at a time (an optimizer step's), each window with its weight summed over processes.

        Each process reads up to ``size`` micro-batches ahead and one gather of their
        sample counts and weights (``weigh(batch)``: the loop's answer tokens) tells
        every process how many of them all processes have: the window is cut there, and
        the epoch ends with a cut window, its batches still trained as a step of their
        own. That is one exchange, and one wait of the host for it, per optimizer step
        instead of per micro-batch. The position saved at a step's end (``state_dict``)
        is that after the window's last batch: nothing read ahead is lost by a resume.
        """
        self.exhausted = False
        local, resumed = self._worker_batches() if self.num_workers else self._own_batches()
        batches = 0
        try:
            while True:
                window = list(itertools.islice(local, size))
                sizes = torch.zeros(size, 2, dtype=torch.float64)  # (samples, weight) of each batch read; 0 samples: none
                for i, (ids, batch) in enumerate(window):
                    sizes[i, 0], sizes[i, 1] = len(ids), weigh(batch)
                everyone = self.accelerator.gather(sizes.to(self.accelerator.device)).view(-1, size, 2).cpu()
                if batches == 0 and self.stream.epoch == 0 and not resumed:
                    self._check_first_batch(everyone[:, 0, 0].long().tolist())
                on_all = (everyone[:, :, 0] > 0).all(dim=0).long().cumprod(0)  # 1 up to the first batch some process lacks
                taken = int(on_all.sum())
                batches += taken
                if taken < size:  # the epoch ends with this window: known before it trains, so a stop at its step sees the end
                    self.exhausted, self.batches_last_epoch = True, batches
                if taken:
                    yield [self._ready(ids, batch) for ids, batch in window[:taken]], float(everyone[:, :taken, 1].sum())
                if taken < size:
                    return
        finally:
            local.close()  # with workers: stops them now rather than when the generator is collected

    def _check_first_batch(self, counts: list[int]) -> None:
        """The epoch's first micro-batch on every process (``counts`` samples) is a whole one, else all stop here together."""
        # A worker's part may end with a short batch and a budget's batches vary, so then only an empty start is an error.
        if min(counts) < (self.batch_size if not self.num_workers and self.budget is None else 1):
            raise DataError(
                f"the training stream holds fewer samples than one global batch ({self.batch_size} on each of "
                f"{self.accelerator.num_processes} processes; their parts start with {counts}): add shards or lower "
                "--per_device_train_batch_size" + (" or --num_workers" if self.num_workers else "")
            )

    def _ready(self, ids: list[str], batch: dict) -> dict:
        if self.record_samples:
            batch[INDICES_KEY] = ids
        return send_to_device(batch, self.accelerator.device)

    def _own_batches(self):
        """Batches read and collated in this process; and whether the stream continues a saved position."""
        resumed = self.stream.start()

        def batches():
            while True:
                pairs = take_batch(self.stream, self.batch_size, self.budget)
                if not pairs:
                    return
                yield [i for i, _ in pairs], self.collator([item for _, item in pairs])

        return batches(), resumed

    def _worker_batches(self):
        """Batches from the worker parts in turn, skipping ended parts' markers until every part has ended."""
        workers, epoch = self.num_workers, self.stream.epoch
        restored, self._restored = self._restored, None
        resumed = restored is not None and restored["epoch"] == epoch
        self._parts = restored if resumed else self._fresh_parts()
        dataset = _WorkerParts(self.stream, self.collator, self.batch_size, self.budget, workers, self._parts["next_part"], list(self._parts["parts"]))

        def batches():
            ended = set()
            for item in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers):
                part = item["part"]
                self._parts["parts"][part] = item["state"]
                self._parts["next_part"] = (part + 1) % workers
                self.stream.skipped_bad_samples = self._parts["skipped_before"] + sum(
                    s["skipped_bad_samples"] for s in self._parts["parts"] if s is not None
                )
                if item["batch"] is not None:
                    yield item["ids"], item["batch"]
                    continue
                ended.add(part)
                if len(ended) == workers:
                    return

        return batches(), resumed

    def __len__(self) -> int:
        """Batches of the last whole epoch, or 0 before one has ended: a stream's length is known only at its end."""
        return self.batches_last_epoch or 0

    def state_dict(self) -> dict:
        if not self.num_workers:
            return self.stream.state_dict()
        return self._fresh_parts() if self._parts is None else self._parts  # None: saved before the first batch

    def _fresh_parts(self) -> dict:
        """The worker parts' state at the start of the stream's current epoch: every part at its beginning, part 0's turn."""
        return {"epoch": self.stream.epoch, "num_workers": self.num_workers, "next_part": 0,
                "parts": [None] * self.num_workers, "skipped_before": self.stream.skipped_bad_samples}

    def load_state_dict(self, state: dict) -> None:
        workers = state.get("num_workers", 0)
        if workers != self.num_workers:
            raise DataError(
                f"the checkpoint's stream position was saved with --num_workers {workers} and this run has "
                f"--num_workers {self.num_workers}: each worker reads its own part, so resume with the same count"
            )
        if not workers:
            self.stream.load_state_dict(state)
            return
        self.stream.set_epoch(state["epoch"])
        self.stream.skipped_bad_samples = state["skipped_before"]
        self._restored = state
