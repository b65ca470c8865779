"""Padding-free packing: several samples share one row, each attending only to itself.

:class:`PackingCollator` turns a batch of N samples into at most N rows of at most
``max_seq_len`` tokens, placing the samples longest first into the first row with room
(first-fit decreasing). The per-process micro-batch stays N *samples*; only the number
of rows varies. Rows are right-padded to the longest row.

What keeps the samples apart:

* ``position_ids`` restart at 0 at each sample (rotary positions are those of the
  sample on its own), and on the padding tail, which thereby forms its own block;
* the model passes ``attention_mask=None`` with these ``position_ids`` to the decoder,
  and transformers' mask builder (``masking_utils.find_packed_sequence_indices``)
  turns every restart into a block boundary: a block-diagonal causal mask for SDPA,
  eager and MMCA alike (a flex-attention ``BlockMask`` would skip the empty blocks);
* the label on each sample's first token is dropped: that position would otherwise be
  predicted from the previous sample's last token. In the padded batch no position
  predicts it either, so both batches take loss on exactly the same tokens.

``attention_mask`` keeps its contract meaning (1 on real tokens) so token counts are
unchanged, and ``document_ids`` numbers the samples of a row 0, 1, ... (-1 on padding).
"""

from __future__ import annotations

import torch

from mmtrain.data.collator import BATCH_KEYS, OPTIONAL_KEYS, BatchCollator, images_of, label_positions
from mmtrain.data.template import IGNORE_INDEX


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of total length <= ``capacity`` (first-fit decreasing).

    Samples keep their batch order inside a row; the rows are ordered by their first sample.
    """
    too_long = [n for n in lengths if n > capacity]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit a packed row of {capacity} (--max_seq_len)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    rows = [sorted(row) for row in rows]
    return sorted(rows, key=lambda row: row[0])


def empty_rows(rows: int, length: int, pad_token_id: int, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """A packed batch's ``[rows, length]`` tensors before any sample is placed (``length`` rounded up to
    ``multiple``): pad ids, no labels, no real tokens, positions 0, no sample (-1)."""
    if multiple:
        length = -(-length // multiple) * multiple
    shape = (rows, length)
    return {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "document_ids": torch.full(shape, -1, dtype=torch.long),
    }


class PackingCollator(BatchCollator):
    """Pack a batch's samples into rows of at most ``max_seq_len`` tokens (see the module docstring)."""

    output_keys = BATCH_KEYS + OPTIONAL_KEYS

    def __init__(self, pad_token_id: int, max_seq_len: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("PackingCollator needs a pad token id (the tokenizer has no pad token)")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.pad_token_id = int(pad_token_id)
        self.max_seq_len = int(max_seq_len)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        rows = first_fit_rows([len(item["input_ids"]) for item in items], self.max_seq_len)
        longest = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        grid = empty_rows(len(rows), longest, self.pad_token_id, self.pad_to_multiple_of)
        input_ids, labels, attention_mask, position_ids, document_ids = grid.values()
        length = input_ids.shape[1]
        segments = []  # lengths of the samples and padding tails, rows end to end (the batch's cu_seq_lens)
        for r, row in enumerate(rows):
            start = 0
            for doc, i in enumerate(row):
                item = items[i]
                n = len(item["input_ids"])
                end = start + n
                input_ids[r, start:end] = item["input_ids"]
                labels[r, start:end] = item["labels"]
                labels[r, start] = IGNORE_INDEX  # never predicted from the previous sample
                attention_mask[r, start:end] = 1
                position_ids[r, start:end] = torch.arange(n)
                document_ids[r, start:end] = doc
                segments.append(n)
                start = end
            # The padding tail restarts its positions too: a block of its own.
            position_ids[r, start:] = torch.arange(length - start)
            if length > start:
                segments.append(length - start)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **images_of([[items[i] for i in row] for row in rows]),
            "label_positions": label_positions(labels),
            "position_ids": position_ids,
            "document_ids": document_ids,
            "cu_seq_lens": torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32),
            "max_segment_len": max(segments),
        }


def samples_in(batch: dict) -> int | torch.Tensor:
    """Samples in a batch: its rows, or with packing the packed samples of all rows.

    For a packed batch this is a 0-d tensor on the batch's device (not read back here).
    """
    shard = batch.get("sequence_shard")
    if shard is not None and shard[0] != 0:
        return 0  # a row split across processes is counted once, by the first of them
    documents = batch.get("document_ids")
    if documents is None:
        return int(batch["input_ids"].shape[0])
    return (documents.amax(dim=1) + 1).sum()
