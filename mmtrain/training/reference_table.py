"""``--precompute_ref``: the DPO reference's log-probabilities of every pair, computed once before training.

Once for the run, not once an epoch: the reference is the starting model, fixed for the
whole run, and a pair's tokens and images are the same in every epoch (DPO refuses what
would change them between epochs: sample concatenation, streams), so a pass per epoch
would compute the same numbers again. Each training step then runs the policy's forward
only, and the reference's starting copies (with ``--lm_training full`` a frozen copy of
the LM's weights) are freed once the table is made (:meth:`ReferencePolicy.free`).

The table holds, for the training pairs and the held-out pairs, each pair's summed
log-probability of its chosen and of its rejected answer (``[pairs, 2]`` float32 on the
host, row ``i`` the dataset's pair ``i``: 8 bytes a pair, 8 MB per million pairs, in
every process, since the sampler deals pairs to other processes each epoch). The batches
carry their pairs' dataset indices (:data:`mmtrain.training.sample_record.INDICES_KEY`).

Made with the model in eval mode (no dropout), ``--per_device_eval_batch_size`` padded
pairs a batch; process ``r`` of ``P`` takes pairs ``r, r + P, ...`` and every process
runs as many batches (each ZeRO-3 forward gathers on all of them), then every process
gets every row. A pair dropped for an unreadable image (``--on_bad_sample skip``) keeps
NaN, never read since training drops it too. The table is saved in every checkpoint
(:data:`TABLE_FILE`) and a resumed run reads it instead of computing it again, so it
uses the very numbers of the run it continues, on any process count.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from accelerate.utils import send_to_device
from torch.utils.data import Dataset

from mmtrain.training.sample_record import INDICES_KEY, IndexedDataset, IndexingCollator

logger = logging.getLogger("mmtrain")

TABLE_FILE = "reference_logps.pt"
SPLITS = ("train", "eval")


class ReferenceTable:
    """``{split: [pairs, 2]}`` reference log-probabilities (chosen, rejected), looked up by dataset index."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables

    def lookup(self, split: str, indices: list[int], device) -> torch.Tensor:
        """``[2P]``: the chosen answers' values of the batch's ``P`` pairs, then the rejected ones' (a pair batch's row order).

        Index -1 (a batch's placeholder pair, nothing to learn) reads 0, the log-probability of no answer token.
        """
        table = self.tables[split]
        rows = torch.tensor(indices, dtype=torch.long)
        values = table[rows.clamp(min=0)].masked_fill((rows < 0)[:, None], 0.0)
        return values.t().reshape(-1).to(device, non_blocking=True)

    def save(self, folder: str) -> None:
        torch.save(self.tables, os.path.join(folder, TABLE_FILE))

    @classmethod
    def load(cls, folder: str) -> ReferenceTable | None:
        """The table a checkpoint holds, or None (written by a run without ``--precompute_ref``)."""
        path = os.path.join(folder, TABLE_FILE)
        if not os.path.isfile(path):
            return None
        return cls(torch.load(path, map_location="cpu", weights_only=True))

    def covers(self, datasets: dict[str, object]) -> bool:
        """Whether it has a row for every pair of each of ``datasets`` (``{split: dataset or None}``)."""
        return all(
            dataset is None or len(dataset) == 0 or (split in self.tables and len(self.tables[split]) == len(dataset))
            for split, dataset in datasets.items()
        )


def load_or_compute(accelerator, model, objective, datasets: dict[str, object], collator, resume_path: str | None, make_loader) -> ReferenceTable:
    """The table a resumed checkpoint holds, or :func:`compute_table`'s; then the reference's starting copies are freed."""
    table = ReferenceTable.load(resume_path) if resume_path else None
    if table is not None and table.covers(datasets):
        logger.info(f"DPO reference log-probabilities read from {resume_path} (--precompute_ref)")
    else:
        table = compute_table(accelerator, model, objective, datasets, collator, make_loader)
    objective.reference.free()
    return table


def compute_table(accelerator, model, objective, datasets: dict[str, object], collator, make_loader) -> ReferenceTable:
    """The reference's log-probabilities of every pair of ``datasets`` (``{split: dataset or None}``), on every process.

    ``objective``: the run's :class:`mmtrain.training.preference.PreferenceObjective`;
    ``collator`` pads pairs (:class:`mmtrain.data.preference.PairCollator`);
    ``make_loader(dataset, collator)`` gives a plain, unshuffled loader.
    """
    start = time.perf_counter()
    tables = {split: _compute_split(accelerator, model, objective, dataset, collator, make_loader) for split, dataset in datasets.items() if dataset is not None and len(dataset)}
    counts = ", ".join(f"{len(t):,} {split}" for split, t in tables.items())
    logger.info(f"DPO reference log-probabilities precomputed for {counts} pairs in {time.perf_counter() - start:.1f} s (--precompute_ref)")
    return ReferenceTable(tables)


def _compute_split(accelerator, model, objective, dataset, collator, make_loader) -> torch.Tensor:
    processes, rank = accelerator.num_processes, accelerator.process_index
    n = len(dataset)
    per_process = -(-n // processes)
    positions = list(range(rank, per_process * processes, processes))  # past the end: a pair again, its values dropped
    subset = IndexedDataset(_Share(dataset, [p % n for p in positions]))
    loader = make_loader(subset, IndexingCollator(collator))
    mine = torch.full((per_process, 2), float("nan"), dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            local = batch.pop(INDICES_KEY)
            batch = send_to_device(batch, accelerator.device)  # a plain loader's batches stay on the host
            values = objective.reference_logps(model, batch).float().cpu()
            pairs = len(local)
            for row, k in enumerate(local):
                if k >= 0:
                    mine[k] = torch.stack([values[row], values[pairs + row]])
    model.train(was_training)
    if processes == 1:
        return mine[:n]
    everyone = accelerator.gather(mine.to(accelerator.device)).cpu().reshape(processes, per_process, 2)
    return everyone.transpose(0, 1).reshape(-1, 2)[:n].contiguous()


class _Share(Dataset):
    """The pairs of ``dataset`` at ``rows``, in that order (one process's share), and its placeholder pair."""

    def __init__(self, dataset, rows: list[int]):
        self.dataset = dataset
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        return self.dataset[self.rows[k]]

    def placeholder_item(self):
        return self.dataset.placeholder_item()
