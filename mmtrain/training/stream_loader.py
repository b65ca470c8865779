"""The training loader of a ``--streaming`` run: batches from each process's own part of the shards.

Accelerate's prepared loader cannot be used here: for an iterable dataset it either
reads everything on the main process and sends it out, or has every process read the
whole stream and keep every P-th batch. Each process reads its own part instead
(:class:`mmtrain.data.streaming.ShardStream`), and the processes agree before every
micro-batch that all of them have one, so that a process whose part ran out first ends
the epoch for all instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device

from mmtrain.data.formats import DataError
from mmtrain.data.streaming import ShardStream
from mmtrain.training.sample_record import INDICES_KEY


class StreamLoader:
    """Micro-batches of ``batch_size`` items from ``stream``, on this process's device.

    ``exhausted`` says whether the last iteration ran to the end of the epoch;
    ``state_dict`` is the stream's position after the last batch handed out.
    """

    def __init__(self, accelerator, stream: ShardStream, collator, batch_size: int, record_samples: bool):
        self.accelerator = accelerator
        self.stream = stream
        self.collator = collator
        self.batch_size = batch_size
        self.record_samples = record_samples
        self.exhausted = False
        self.batches_last_epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        self.exhausted = False
        resumed = self.stream.start()
        batches = 0
        while True:
            pairs = []
            while len(pairs) < self.batch_size:
                pair = self.stream.next_item()
                if pair is None:
                    break
                pairs.append(pair)
            counts = self.accelerator.gather(torch.tensor([len(pairs)], device=self.accelerator.device)).tolist()
            if batches == 0 and self.stream.epoch == 0 and not resumed and min(counts) < self.batch_size:
                # Every process sees the same counts, so all stop here together.
                raise DataError(
                    f"the training stream holds fewer samples than one global batch ({self.batch_size} on each of "
                    f"{self.accelerator.num_processes} processes; their parts start with {counts}): add shards or lower "
                    "--per_device_train_batch_size"
                )
            if min(counts) == 0:
                break
            batch = self.collator([item for _, item in pairs])
            if self.record_samples:
                batch[INDICES_KEY] = [sample_id for sample_id, _ in pairs]
            batches += 1
            yield send_to_device(batch, self.accelerator.device)
        self.exhausted = True
        self.batches_last_epoch = batches

    def __len__(self) -> int:
        """Batches of the last whole epoch, or 0 before one has ended: a stream's length is known only at its end."""
        return self.batches_last_epoch or 0

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
