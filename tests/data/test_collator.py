"""The padding collator: right padding, rounding, label positions, images in order, the batch contract."""

from __future__ import annotations

import pytest
import torch

from mmtrain.data import BATCH_KEYS, IGNORE_INDEX, Collator

PAD = 2
SIZE = 4  # pixels per side of the hand-made images: the collator never looks inside them


def _item(ids, labels=None, images=()):
    """A dataset item; ``images`` are fill values, one solid image each."""
    labels = list(ids) if labels is None else labels
    pixels = torch.stack([torch.full((3, SIZE, SIZE), float(v)) for v in images]) if images else torch.zeros(0, 3, SIZE, SIZE)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixels}


def _set_targets(labels: torch.Tensor) -> list[int]:
    """Flat indices, row by row in the [B, L-1] grid of next-token targets, of the labels that are set."""
    rows, length = labels.shape
    return [r * (length - 1) + t for r in range(rows) for t in range(length - 1) if labels[r, t + 1] != IGNORE_INDEX]


def test_rows_are_right_padded_to_the_longest():
    items = [
        _item([5, 6, 7], [IGNORE_INDEX, 6, 7]),
        _item([8, 9, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12]),
        _item([13, 14], [IGNORE_INDEX, 14]),
    ]
    batch = Collator(PAD)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, PAD, PAD], [8, 9, 10, 11, 12], [13, 14, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, 6, 7, x, x], [x, x, 10, 11, 12], [x, 14, x, x, x]]
    for key in ("input_ids", "attention_mask", "labels", "image_counts", "label_positions"):
        assert batch[key].dtype == torch.long, key


@pytest.mark.parametrize(("multiple", "length"), [(None, 5), (1, 5), (4, 8), (5, 5), (8, 8)])
def test_pad_to_multiple_of_rounds_the_length_up(multiple, length):
    batch = Collator(PAD, pad_to_multiple_of=multiple)([_item([5, 6, 7]), _item([8, 9, 10, 11, 12])])
    assert batch["input_ids"].shape == (2, length)
    # the rounding adds padding only: no label, no attention, the pad id
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 5]
    assert (batch["input_ids"][:, 5:] == PAD).all() and (batch["labels"][:, 5:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("multiple", [None, 8])
def test_label_positions_are_the_set_targets_of_the_shifted_labels(multiple):
    x = IGNORE_INDEX
    items = [
        _item([1, 2, 3, 4], [x, x, 3, 4]),
        _item([1, 5, 6, 7, 8, 9], [x, 5, x, x, 8, 9]),  # two answer spans
        _item([1, 2], [x, x]),  # a row with no target at all
        _item([1, 2, 3], [1, 2, 3]),  # a label on the first token is no target (nothing predicts it)
    ]
    batch = Collator(PAD, pad_to_multiple_of=multiple)(items)
    positions = batch["label_positions"]
    assert positions.tolist() == _set_targets(batch["labels"])
    targets = batch["labels"][:, 1:].flatten()[positions]
    assert targets.tolist() == [3, 4, 5, 8, 9, 2, 3]
    # the logits predicting them are the ones one step earlier in each row
    length = batch["labels"].shape[1]
    rows, steps = positions // (length - 1), positions % (length - 1)
    assert batch["input_ids"][rows, steps].tolist() == [2, 3, 1, 7, 8, 1, 2]


def test_label_positions_of_real_samples_pick_the_answers(tmp_path, mk, build, tokenizer):
    mk.solid(tmp_path / "a.png", (255, 0, 0))
    records = [mk.llava("What is two plus two?", "four"), mk.llava("<image>\nColor?", "red", image="a.png")]
    bundle = build([mk.json(tmp_path / "d.json", records)])
    batch = Collator(tokenizer.pad_token_id)([bundle.train[0], bundle.train[1]])
    targets = batch["labels"][:, 1:].flatten()[batch["label_positions"]]
    assert tokenizer.decode(targets) == "four" + tokenizer.eos_token + "red" + tokenizer.eos_token


def test_images_are_stacked_in_item_order_with_their_counts():
    items = [_item([1, 2], images=[10, 11]), _item([1, 2, 3]), _item([1], images=[12])]
    batch = Collator(PAD)(items)
    assert batch["image_counts"].tolist() == [2, 0, 1]
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) == (int(batch["image_counts"].sum()), 3, SIZE, SIZE)
    assert [float(p[0, 0, 0]) for p in batch["pixel_values"]] == [10.0, 11.0, 12.0]
    text_only = Collator(PAD)([_item([1, 2]), _item([3])])
    assert text_only["pixel_values"].shape == (0, 3, SIZE, SIZE) and text_only["image_counts"].tolist() == [0, 0]


def test_batch_holds_the_contract_keys_and_says_it_is_right_padded():
    batch = Collator(PAD, pad_to_multiple_of=4)([_item([1, 2, 3], images=[1]), _item([4])])
    assert set(batch) == set(Collator.output_keys) == set(BATCH_KEYS) | {"label_positions", "right_padded"}
    assert batch["right_padded"] is True
    # what the flag promises: in every row the real tokens come first, then only padding
    for row in batch["attention_mask"].tolist():
        real = sum(row)
        assert row == [1] * real + [0] * (len(row) - real)


def test_a_tokenizer_without_pad_token_and_an_empty_batch_are_refused():
    with pytest.raises(ValueError, match="pad token"):
        Collator(None)
    with pytest.raises(ValueError, match="empty batch"):
        Collator(PAD)([])
