"""The DPO bench's preference pairs: one image, a prompt and two answers of equal length, the same for both systems.

Pair ``i`` is drawn from ``seed`` alone: a random RGB image at the vision encoder's input
size, a prompt of random words and two answers of ``answer_tokens`` random words each.
The words are the tokenizer's single-token words (a space and letters) that encode back
to themselves, so the text TRL tokenizes gives exactly the ids mmtrain trains on; each
half of a pair is

    <bos> <im_start> <image> x image tokens <im_end> prompt words | answer words

``tokens_per_half`` long, image tokens included. mmtrain reads a pair as
:class:`mmtrain.data.preference.PreferenceDataset` items (the chosen half's ids and
labels, the rejected half's, the pixels once), TRL as its vision layout: ``prompt``,
``chosen`` and ``rejected`` text and ``images``, the prompt's image as LLaVA's processor
expands it.
"""

from __future__ import annotations

import random

import numpy as np
import torch

IGNORE_INDEX = -100


def single_token_words(tokenizer, vocab_size: int) -> list[int]:
    """Ids of the tokenizer's words that decode to a space and letters and encode back to that one id."""
    words = []
    for i in range(vocab_size):
        if i in tokenizer.all_special_ids:
            continue
        text = tokenizer.decode([i])
        if len(text) > 1 and text[0] == " " and text[1:].isalpha() and tokenizer.encode(text, add_special_tokens=False) == [i]:
            words.append(i)
    if len(words) < 10:
        raise ValueError(f"the tokenizer has only {len(words)} single-token words; the bench's text needs more")
    return words


class PreferencePairs(torch.utils.data.Dataset):
    """``n`` seeded pairs: mmtrain's dataset items (``__getitem__``) and TRL's columns (:meth:`trl_columns_of`)."""

    def __init__(self, n: int, tokenizer, image_tokens, image_processor, image_size: int, *, tokens_per_half: int,
                 answer_tokens: int, seed: int):
        self.n = n
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_processor = image_processor
        self.image_size = image_size
        self.tokens_per_half = tokens_per_half
        self.answer_tokens = answer_tokens
        self.prompt_tokens = tokens_per_half - 1 - image_tokens.span_length - answer_tokens
        if self.prompt_tokens < 1 or answer_tokens < 1:
            raise ValueError(
                f"a half of {tokens_per_half} tokens cannot hold <bos>, the image span ({image_tokens.span_length}), "
                f"a prompt word and {answer_tokens} answer tokens"
            )
        self.seed = seed
        self.words = single_token_words(tokenizer, image_tokens.original_vocab_size)

    def __len__(self) -> int:
        return self.n

    def text_ids(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """Pair ``i``'s prompt, chosen and rejected word ids (the rejected answer differs from the chosen one)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = random.Random(self.seed * 1_000_003 + i)
        prompt = rng.choices(self.words, k=self.prompt_tokens)
        chosen = rng.choices(self.words, k=self.answer_tokens)
        rejected = rng.choices(self.words, k=self.answer_tokens)
        if rejected == chosen:
            rejected[0] = next(w for w in self.words if w != chosen[0])
        return prompt, chosen, rejected

    def image(self, i: int):
        """Pair ``i``'s image: random RGB pixels at the encoder's input size (a PIL image, as a dataset holds one)."""
        from PIL import Image

        rng = np.random.default_rng(self.seed * 1_000_003 + i)
        return Image.fromarray(rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8))

    def halves(self, i: int) -> tuple[list[int], list[int], int]:
        """Pair ``i``'s chosen and rejected token ids and where its answers start."""
        prompt, chosen, rejected = self.text_ids(i)
        head = [self.tokenizer.bos_token_id, *self.image_tokens.span(), *prompt]
        return head + chosen, head + rejected, len(head)

    def __getitem__(self, i: int) -> dict:
        chosen, rejected, answer_start = self.halves(i)
        item = {}
        for prefix, ids in (("", chosen), ("rejected_", rejected)):
            ids = torch.tensor(ids, dtype=torch.long)
            labels = ids.clone()
            labels[:answer_start] = IGNORE_INDEX
            item[f"{prefix}input_ids"], item[f"{prefix}labels"] = ids, labels
        item["pixel_values"] = self.image_processor(images=[self.image(i)], return_tensors="pt")["pixel_values"]
        return item

    def lengths(self) -> list[int]:
        """Tokens of every half (chosen, rejected) of every pair, image tokens included."""
        return [self.tokens_per_half] * (2 * self.n)

    def prompt_text(self, i: int) -> str:
        """Pair ``i``'s prompt as TRL's processor reads it: the image as ``<im_start><image><im_end>``, expanded by the processor."""
        t = self.tokenizer
        if self.image_tokens.start_id is None:
            raise ValueError("the bench's pairs are written with mmtrain's image markup (<im_start> ... <im_end>)")
        prompt, _, _ = self.text_ids(i)
        start, image, end = t.convert_ids_to_tokens([self.image_tokens.start_id, self.image_tokens.image_id, self.image_tokens.end_id])
        return t.bos_token + start + image + end + t.decode(prompt)

    def trl_columns_of(self, indices) -> dict[str, list]:
        """Pairs ``indices`` in TRL's vision preference layout (standard, not conversational): prompt, chosen, rejected, images."""
        columns = {"prompt": [], "chosen": [], "rejected": [], "images": []}
        for i in indices:
            _, chosen, rejected = self.text_ids(i)
            columns["prompt"].append(self.prompt_text(i))
            columns["chosen"].append(self.tokenizer.decode(chosen))
            columns["rejected"].append(self.tokenizer.decode(rejected))
            columns["images"].append([self.image(i)])
        return columns


def pairs_for(opts, built, n: int) -> PreferencePairs:
    """``n`` pairs of the bench's options (``tokens_per_half``, ``answer_tokens``, ``seed``) for the model ``built``."""
    return PreferencePairs(n, built.tokenizer, built.image_tokens, built.image_processor, built.model.vision.image_size,
                           tokens_per_half=opts.tokens_per_half, answer_tokens=opts.answer_tokens, seed=opts.seed)
