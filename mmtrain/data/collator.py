"""Turn dataset items into padded batches.

The batch contract (what the model's forward and the trainer rely on):

==================  =====================  ===================================================
key                 shape / dtype          meaning
==================  =====================  ===================================================
``input_ids``       [B, L] long            token ids, right-padded with the pad id
``attention_mask``  [B, L] long            1 on real tokens, 0 on padding
``labels``          [B, L] long            target ids; -100 where no loss is taken
``pixel_values``    [N, 3, H, W] float     every image of the batch, sample by sample, in
                                           placeholder order; N may be 0
``image_counts``    [B] long               images of each row; sums to N
==================  =====================  ===================================================

Optional keys (:data:`OPTIONAL_KEYS`):

* ``label_positions`` [K] long: the flat indices, in the ``[B, L - 1]`` grid of
  next-token targets (``labels[:, 1:]``), of the K targets that are not -100. Both
  collators here add it. It is computed on the CPU, so the model picks the positions
  that reach the output head without reading a count back from the GPU (a boolean-mask
  index would wait for the GPU to finish everything queued before it). Without it the
  model derives the same positions from ``labels``.
* ``right_padded`` (a Python ``True``, not a tensor): every row's padding comes after
  all its real tokens. :class:`Collator` sets it. Under causal attention a real token
  then never sees a padding key, so the model drops the padding mask and attention
  keeps its causal kernel (the masked one computes every block of the square). Padding
  positions carry no label, so what they compute is never used.
* A packing collator (several samples per row) adds ``position_ids`` [B, L]
  (restarting at 0 for each packed sample) and ``document_ids`` [B, L] (which packed
  sample a token belongs to, for a block-diagonal attention mask) and keeps the keys
  above with the same meaning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from mmtrain.data.template import IGNORE_INDEX

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts")
OPTIONAL_KEYS = ("label_positions", "right_padded", "position_ids", "document_ids")


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the set targets in ``labels[:, 1:]`` (see ``label_positions`` above)."""
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().flatten()


class BatchCollator(ABC):
    """A callable from a list of dataset items to a batch dict following the contract above."""

    output_keys: tuple[str, ...] = BATCH_KEYS

    @abstractmethod
    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]: ...


class Collator(BatchCollator):
    """Pad each batch to its longest sample (right padding) and stack its images.

    Text-only items (``pixel_values`` with 0 rows) mix freely with image items.
    ``pad_to_multiple_of`` rounds the padded length up (tensor-core friendly shapes).
    """

    output_keys = BATCH_KEYS + ("label_positions", "right_padded")

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("Collator needs a pad token id (the tokenizer has no pad token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        pixel_values = torch.cat([item["pixel_values"] for item in items], dim=0)
        image_counts = torch.tensor([item["pixel_values"].shape[0] for item in items], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixel_values,
            "image_counts": image_counts,
            "label_positions": label_positions(labels),
            "right_padded": True,
        }
