"""``--record_samples``: which dataset items each process trained on, micro-batch by micro-batch.

Every process appends to ``output_dir/samples/rank-N.jsonl`` one line per training
micro-batch: ``{"epoch", "step", "indices"}``, where ``step`` is the optimizer step the
micro-batch counts towards and ``indices`` are positions in the training dataset
(``shard:record`` ids under ``--streaming``). The
union over all files says what an epoch covered, also across a resume on another process
count (a resume first drops every line of a step after its checkpoint's).
"""

from __future__ import annotations

import glob
import json
import os

from torch.utils.data import Dataset

SAMPLES_DIR = "samples"
INDICES_KEY = "sample_indices"


class IndexedDataset(Dataset):
    """``dataset``'s items, each with its index: ``(i, item)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (i, item)  # None: dropped (--on_bad_sample skip)

    def placeholder_item(self):
        return -1, self.dataset.placeholder_item()  # -1: no sample of the dataset

    # What the token-budget sampler reads of the dataset it plans (mmtrain/data/token_budget.py).
    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def item_sizes(self):
        return self.dataset.item_sizes()


class IndexingCollator:
    """``collator``'s batch of the items, plus their indices under :data:`INDICES_KEY`."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, pairs):
        batch = self.collator([item for _, item in pairs])
        batch[INDICES_KEY] = [int(i) for i, _ in pairs]
        return batch


def indexed(dataset, collator, record: bool):
    """The dataset and collator a loader gets: as they are, or indexed (``--record_samples``, ``--precompute_ref``).

    A stream's items carry their own stable ids (``shard:record``), which its loader adds.
    """
    if not hasattr(dataset, "__getitem__"):
        return dataset, collator
    return (IndexedDataset(dataset), IndexingCollator(collator)) if record else (dataset, collator)


class SampleRecord:
    def __init__(self, accelerator, output_dir: str, enabled: bool):
        self.path = os.path.join(output_dir, SAMPLES_DIR, f"rank-{accelerator.process_index}.jsonl") if enabled else None
        self.accelerator = accelerator

    def rewind(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (a resumed checkpoint's), in every process's file."""
        if self.path is None:
            return
        if self.accelerator.is_main_process:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            for path in glob.glob(os.path.join(os.path.dirname(self.path), "rank-*.jsonl")):
                with open(path) as f:
                    lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
                with open(path + ".tmp", "w") as f:
                    f.writelines(lines)
                os.replace(path + ".tmp", path)
        self.accelerator.wait_for_everyone()

    def write(self, epoch: int, step: int, batch: dict) -> None:
        """Record ``batch``'s indices (the training step takes them out of it: the model does not want them)."""
        indices = batch.get(INDICES_KEY)
        if self.path is None or indices is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "indices": indices}) + "\n")
