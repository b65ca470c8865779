"""Preference pairs as training items and batches (``--objective dpo``).

A pair (:mod:`mmtrain.data.formats`: turns ending on the chosen answer, plus the rejected
answer) is one dataset item holding both encodings and its images once. A batch of P
pairs is 2P rows, the P chosen rows then the P rejected rows in the same order, with the
pairs' images once and ``image_repeats = 2`` (:mod:`mmtrain.batch`): each image is
encoded once and its features serve both answers. A pair is never split: both halves
are in the same micro-batch, and batches count pairs.
"""

from __future__ import annotations

import torch

from mmtrain.data.collator import Collator
from mmtrain.data.dataset import ConversationDataset, Entry, decode_images, split_turns
from mmtrain.data.packing import PackingCollator
from mmtrain.data.template import IGNORE_INDEX, encode_conversation
from mmtrain.image_tokens import IMAGE_PLACEHOLDER


def with_answer(turns: list[dict], answer: str) -> list[dict]:
    """The turns with their last (assistant) answer replaced by ``answer``."""
    return [*turns[:-1], {"role": "assistant", "text": answer}]


def fit_pair(record: dict, data_args, tokenizer, image_tokens, counts: dict, split: str, row: int = 0, image_sizes=None) -> Entry | None:
    """A pair's entry (its longer half's length), or None when either half is longer than a sample may be (counted as dropped).

    A pair is never truncated: dropping turns would cut the answers it compares.
    """
    lengths = []
    for turns in (record["turns"], with_answer(record["turns"], record["rejected"])):
        encoded = encode_conversation(
            turns, tokenizer, image_tokens, template=data_args.template, system_prompt=data_args.system_prompt, image_sizes=image_sizes
        )
        lengths.append(len(encoded.input_ids))
    # Under a token budget both halves share one micro-batch, so together they must fit it.
    cap = getattr(data_args, "max_image_tokens", None)
    over_cap = cap is not None and encoded.input_ids.count(image_tokens.image_id) > cap
    if over_cap or max(lengths) > data_args.longest_sample() or (data_args.max_tokens_per_batch and sum(lengths) > data_args.max_tokens_per_batch):
        counts[f"dropped_overlength_{split}"] += 1
        return None
    _, body = split_turns(record["turns"])
    num_images = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in body)
    counts[f"text_only_{split}"] += num_images == 0
    counts[f"images_{split}"] += num_images
    counts[f"tokens_{split}"] += sum(lengths)
    counts[f"longest_sample_{split}"] = max(counts[f"longest_sample_{split}"], *lengths)
    return Entry(row, len(body) // 2, max(lengths), num_images, encoded.prefix_length, both_halves=sum(lengths))


class PreferenceDataset(ConversationDataset):
    """Items ``{"input_ids", "labels"}`` of the chosen answer, ``{"rejected_input_ids", "rejected_labels"}``, and ``"pixel_values"`` once."""

    def item_sizes(self) -> list[tuple[int, int]]:
        """``(tokens, images)`` of every pair for a token budget: both halves' tokens, each image once (encoded once)."""
        return [(self.entries[i].both_halves, self.entries[i].num_images) for i in range(len(self))]

    def _item(self, group: tuple[int, ...]) -> dict:
        turns, images = self.conversation(group)
        rejected = self.records[self.entries[group[0]].row]["rejected"]
        decoded = decode_images(images, self.image_store)
        item = self._tensors(self._encode(turns, decoded=decoded), decoded)
        other = self._encode(with_answer(turns, rejected), decoded=decoded)
        item["rejected_input_ids"] = torch.tensor(other.input_ids, dtype=torch.long)
        item["rejected_labels"] = torch.tensor(other.labels, dtype=torch.long)
        return item

    def placeholder_item(self) -> dict:
        """A pair with nothing to learn (no label on either half), for a batch whose every pair was dropped."""
        item = super().placeholder_item()
        item["rejected_input_ids"] = item["input_ids"].clone()
        item["rejected_labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        return item


def halves(items: list[dict]) -> list[dict]:
    """The pairs' chosen halves, then their rejected halves, each with its pair's images."""
    images = [{k: i[k] for k in ("pixel_values", "image_sizes") if k in i} for i in items]
    chosen = [{"input_ids": i["input_ids"], "labels": i["labels"], **im} for i, im in zip(items, images)]
    return chosen + [{"input_ids": i["rejected_input_ids"], "labels": i["rejected_labels"], **im} for i, im in zip(items, images)]


def first_group_images(batch: dict, items: list[dict]) -> None:
    """Keep the chosen rows' images only (``image_repeats = 2``: the rejected rows reuse their features)."""
    batch["pixel_values"] = batch["pixel_values"][: sum(i["pixel_values"].shape[0] for i in items)]
    if "image_sizes" in batch:
        batch["image_sizes"] = batch["image_sizes"][: sum(len(i["image_sizes"]) for i in items)]  # a list: sliced alike
    batch["image_repeats"] = 2


class PairCollator(Collator):
    """P pairs -> 2P padded rows (chosen rows, then rejected rows), their images once, ``image_repeats = 2``."""

    output_keys = Collator.output_keys + ("image_repeats",)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(halves(items))
        first_group_images(batch, items)
        return batch


class PairPackingCollator(PackingCollator):
    """A token budget's micro-batch of P pairs -> one packed row: the P chosen answers, then the P rejected ones.

    The budget planned the pairs from both halves' tokens (:meth:`PreferenceDataset.item_sizes`),
    so all 2P samples fit one row in that order, which is the order :class:`PairCollator`'s
    rows have: the pairs' images once, ``image_repeats = 2``, and ``label_samples`` (each
    label's sample, 0 .. 2P-1) with ``num_samples = 2P``, so the model sums each answer's
    log-probability on its own (:func:`mmtrain.model.vlm.causal_lm_loss`).
    """

    output_keys = PackingCollator.output_keys + ("image_repeats", "label_samples", "num_samples")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows = halves(items)
        total = sum(len(h["input_ids"]) for h in rows)
        if total > self.max_seq_len:
            raise ValueError(f"{len(items)} pairs of {total} tokens do not fit one packed row of {self.max_seq_len} (--max_tokens_per_batch)")
        batch = super().__call__(rows)
        documents = batch["document_ids"][:, 1:].reshape(-1)  # the sample of each target, as label_positions index them
        batch["label_samples"] = documents.index_select(0, batch["label_positions"])
        batch["num_samples"] = len(rows)
        first_group_images(batch, items)
        return batch


def pairs_in(batch: dict) -> int:
    """Pairs in a pair batch: half its rows, or half its packed samples."""
    if "num_samples" in batch:
        return batch["num_samples"] // 2
    return batch["input_ids"].shape[0] // batch.get("image_repeats", 1)
