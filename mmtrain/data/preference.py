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

from mmtrain.data.collator import BATCH_KEYS, OPTIONAL_KEYS, BatchCollator, Collator, images_of
from mmtrain.data.dataset import ConversationDataset, Entry, decode_images, join_conversation, split_turns
from mmtrain.data.packing import PackingCollator, empty_rows
from mmtrain.data.template import IGNORE_INDEX, encode_conversation
from mmtrain.image_tokens import IMAGE_PLACEHOLDER


PAIR_TOKENS = "pair_tokens"  # an item's key: the tokens its pair's batch rows hold (Entry.both_halves)


def with_answer(turns: list[dict], answer: str) -> list[dict]:
    """The turns with their last (assistant) answer replaced by ``answer``."""
    return [*turns[:-1], {"role": "assistant", "text": answer}]


def fit_pair(
    record: dict, data_args, tokenizer, image_tokens, counts: dict, split: str, row: int = 0, image_sizes=None, share_prompt: bool = False,
) -> Entry | None:
    """A pair's entry (its longer half's length), or None when either half is longer than a sample may be (counted as dropped).

    A pair is never truncated: dropping turns would cut the answers it compares.
    ``share_prompt``: the pair is laid out with its prompt once (:class:`SharedPromptCollator`),
    and a token budget counts that layout's tokens. Its images are all in that prompt: the
    reader refuses images in answers, and every template puts an answer heading between
    the last image and the answer.
    """
    halves = []
    for turns in (record["turns"], with_answer(record["turns"], record["rejected"])):
        encoded = encode_conversation(
            turns, tokenizer, image_tokens, template=data_args.template, system_prompt=data_args.system_prompt, image_sizes=image_sizes
        )
        halves.append(encoded)
    lengths = [len(h.input_ids) for h in halves]
    # Under a token budget both halves share one micro-batch, so together they must fit it.
    pair_tokens = sum(lengths)
    if share_prompt:
        pair_tokens -= shared_prompt_length(*(torch.tensor(x) for h in halves for x in (h.input_ids, h.labels)))
    cap = getattr(data_args, "max_image_tokens", None)
    over_cap = cap is not None and encoded.input_ids.count(image_tokens.image_id) > cap
    if over_cap or max(lengths) > data_args.longest_sample() or (data_args.max_tokens_per_batch and pair_tokens > data_args.max_tokens_per_batch):
        counts[f"dropped_overlength_{split}"] += 1
        return None
    _, body = split_turns(record["turns"])
    num_images = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in body)
    counts[f"text_only_{split}"] += num_images == 0
    counts[f"images_{split}"] += num_images
    counts[f"tokens_{split}"] += pair_tokens
    counts[f"longest_sample_{split}"] = max(counts[f"longest_sample_{split}"], *lengths)
    return Entry(row, len(body) // 2, max(lengths), num_images, encoded.prefix_length, both_halves=pair_tokens)


class PreferenceDataset(ConversationDataset):
    """Items ``{"input_ids", "labels"}`` of the chosen answer, ``{"rejected_input_ids", "rejected_labels"}``, and ``"pixel_values"`` once."""

    def item_sizes(self) -> list[tuple[int, int]]:
        """``(tokens, images)`` of every pair for a token budget: both halves' tokens, each image once (encoded once)."""
        return [(self.entries[i].both_halves, self.entries[i].num_images) for i in range(len(self))]

    def _item(self, group: tuple[int, ...]) -> dict:
        turns, images = self.conversation(group)
        entry = self.entries[group[0]]
        return self._pair_item(turns, images, self.records[entry.row]["rejected"], entry.both_halves)

    def record_item(self, record: dict, entry: Entry) -> dict:
        """A streamed pair (not in the table) as an item; raises :class:`BadImageError`."""
        turns, images = join_conversation([(record, entry)])
        return self._pair_item(turns, images, record["rejected"], entry.both_halves)

    def _pair_item(self, turns: list[dict], images: list, rejected: str, pair_tokens: int) -> dict:
        decoded = decode_images(images, self.image_store)
        item = self._tensors(self._encode(turns, decoded=decoded), decoded)
        other = self._encode(with_answer(turns, rejected), decoded=decoded)
        item["rejected_input_ids"] = torch.tensor(other.input_ids, dtype=torch.long)
        item["rejected_labels"] = torch.tensor(other.labels, dtype=torch.long)
        item[PAIR_TOKENS] = pair_tokens  # what a streamed token budget counts (the table's plan reads item_sizes)
        return item

    def placeholder_item(self) -> dict:
        """A pair with nothing to learn (no label on either half), for a batch whose every pair was dropped."""
        item = super().placeholder_item()
        item["rejected_input_ids"] = item["input_ids"].clone()
        item["rejected_labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        return item


def shared_prompt_length(chosen_ids, chosen_labels, rejected_ids, rejected_labels) -> int:
    """Tokens a pair's layout computes once: one less than its halves' common prefix of (token, label).

    The last common token is kept in each branch, so each branch's first position predicts
    its own first differing token (:mod:`mmtrain.model.shared_prompt`).
    """
    n = min(len(chosen_ids), len(rejected_ids))
    differs = (chosen_ids[:n] != rejected_ids[:n]) | (chosen_labels[:n] != rejected_labels[:n])
    common = int(differs.int().argmax()) if bool(differs.any()) else n
    return max(common - 1, 0)


class SharedPromptCollator(BatchCollator):
    """P pairs -> rows of shared-prompt pairs (:mod:`mmtrain.model.shared_prompt`): one pair per row, right-padded,
    or under a token budget (``capacity``) all P in one row.

    Each pair is ``[prompt | chosen branch | rejected branch]``. Labels stay next-token
    labels of the row: a branch's first slot takes no label (the chosen branch's first
    token is the prompt's last target; the rejected branch's would be predicted from the
    chosen branch's end), and the targets of the prompt count for both answers
    (``label_positions`` lists them twice, ``label_samples`` gives one copy to each).
    Samples are numbered as :class:`PairPackingCollator` numbers them: the P chosen
    answers, then the P rejected ones. The pairs' images are given once (no repeats).
    """

    output_keys = BATCH_KEYS + OPTIONAL_KEYS

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, capacity: int | None = None):
        if pad_token_id is None:
            raise ValueError("SharedPromptCollator needs a pad token id (the tokenizer has no pad token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.capacity = capacity

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("cannot collate an empty batch")
        pairs = len(items)
        shared = [
            shared_prompt_length(i["input_ids"], i["labels"], i["rejected_input_ids"], i["rejected_labels"]) for i in items
        ]
        sizes = [len(i["input_ids"]) + len(i["rejected_input_ids"]) - s for i, s in zip(items, shared)]
        rows = [list(range(pairs))] if self.capacity else [[p] for p in range(pairs)]
        length = max(sum(sizes[p] for p in row) for row in rows)
        if self.capacity and length > self.capacity:
            raise ValueError(f"{pairs} pairs of {length} tokens do not fit one packed row of {self.capacity} (--max_tokens_per_batch)")
        grid = empty_rows(len(rows), length, self.pad_token_id, self.pad_to_multiple_of)
        input_ids, labels, attention_mask, position_ids, document_ids = grid.values()
        length = input_ids.shape[1]
        branch_ids = torch.full_like(document_ids, -1)
        q_segments, kv_segments, kv_index = [], [], []
        targets, owners = [], []  # label slots (flat in the [rows, length - 1] grid of targets) and their samples
        for r, row in enumerate(rows):
            start = 0
            base = r * length  # the row's first token in the stream of all rows end to end
            for doc, p in enumerate(row):
                item, s = items[p], shared[p]
                chosen, rejected = item["input_ids"], item["rejected_input_ids"]
                nc, nr = len(chosen), len(rejected) - s
                end = start + nc + nr
                input_ids[r, start:end] = torch.cat([chosen, rejected[s:]])
                labels[r, start : start + nc] = item["labels"]
                labels[r, start + nc + 1 : end] = item["rejected_labels"][s + 1 :]
                labels[r, start] = IGNORE_INDEX  # never predicted from the previous pair
                attention_mask[r, start:end] = 1
                position_ids[r, start:end] = torch.cat([torch.arange(nc), torch.arange(s, s + nr)])
                document_ids[r, start:end] = doc
                branch_ids[r, start : start + s] = 0
                branch_ids[r, start + s : start + nc] = 1
                branch_ids[r, start + nc : end] = 2
                q_segments += [nc, nr]
                kv_segments += [nc, s + nr]
                kv_index += [torch.arange(base + start, base + start + nc), torch.arange(base + start, base + start + s),
                             torch.arange(base + start + nc, base + end)]
                for slot in (labels[r, start + 1 : end] != IGNORE_INDEX).nonzero().flatten().tolist():
                    t = start + 1 + slot  # the target's slot in the row: predicted from slot t - 1
                    flat = r * (length - 1) + t - 1
                    if t - start <= s:
                        targets += [flat, flat]
                        owners += [p, pairs + p]
                    else:
                        targets.append(flat)
                        owners.append(p if t - start < nc else pairs + p)
                start = end
            if length > start:  # the padding tail: a segment of its own
                q_segments.append(length - start)
                kv_segments.append(length - start)
                kv_index.append(torch.arange(base + start, base + length))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **images_of([[items[p] for p in row] for row in rows]),
            "label_positions": torch.tensor(targets, dtype=torch.long),
            "label_samples": torch.tensor(owners, dtype=torch.long),
            "num_samples": 2 * pairs,
            "position_ids": position_ids,
            "document_ids": document_ids,
            "branch_ids": branch_ids,
            "cu_seq_lens": torch.tensor([0, *q_segments], dtype=torch.int32).cumsum(0, dtype=torch.int32),
            "max_segment_len": max(q_segments),
            "kv_index": torch.cat(kv_index),
            "kv_cu_seq_lens": torch.tensor([0, *kv_segments], dtype=torch.int32).cumsum(0, dtype=torch.int32),
            "max_kv_segment_len": max(kv_segments),
        }


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
