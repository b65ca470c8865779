"""Turn dataset items into padded batches following the batch contract (:mod:`mmtrain.batch`)."""

from __future__ import annotations

import torch

from mmtrain.batch import BATCH_KEYS, IGNORE_INDEX, OPTIONAL_KEYS, BatchCollator, label_positions  # noqa: F401  (re-exported)


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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **images_of([[item] for item in items]),
            "label_positions": label_positions(labels),
            "right_padded": True,
        }


def images_of(rows: list[list[dict]]) -> dict[str, torch.Tensor]:
    """``pixel_values`` and ``image_counts`` of rows of items (and ``image_sizes`` when the items are tiled), row after row.

    An item's ``pixel_values`` holds its images, or with AnyRes tiles each image's tiles
    (then ``image_sizes`` has one ``(height, width)`` per image and counts the images).
    Items with videos add ``pixel_values_videos`` and ``video_frames`` (:mod:`mmtrain.batch`).
    """
    items = [item for row in rows for item in row]
    tiled = "image_sizes" in items[0]
    out = {"pixel_values": torch.cat([item["pixel_values"] for item in items], dim=0)}
    per_item = [len(item["image_sizes"]) if tiled else item["pixel_values"].shape[0] for item in items]
    out["image_counts"] = torch.tensor(per_item, dtype=torch.long)
    if len(rows) != len(items):  # several items per row: counts are per row
        bounds = torch.tensor([0] + [len(row) for row in rows]).cumsum(0)
        out["image_counts"] = torch.stack([out["image_counts"][a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    if tiled:  # host-side ints: the model lays the tiles out without reading anything back from the device
        out["image_sizes"] = [tuple(size) for item in items for size in item["image_sizes"].tolist()]
    videos = [item for item in items if "video_frames" in item]
    if videos:  # frames at the encoder's own size, video after video in placeholder order
        out["pixel_values_videos"] = torch.cat([item["pixel_values_videos"] for item in videos], dim=0)
        out["video_frames"] = torch.cat([item["video_frames"] for item in videos], dim=0)
    return out
