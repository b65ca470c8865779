"""The bench's synthetic samples: one image and a seeded number of text tokens each.

Both systems of the throughput bench train on these, so they see the same token counts.
"""

from __future__ import annotations

import torch


class SyntheticSamples(torch.utils.data.Dataset):
    """Items in the trainer's dataset contract (``input_ids``, ``labels``, ``pixel_values``).

    Sample ``i``: ``<bos>`` ``<im_start>`` image tokens ``<im_end>`` text..., ``T_i - 1``
    random text ids after the ``<bos>`` (``T_i`` uniform in ``text_tokens``); labels on
    the last ``floor(label_fraction * T_i)`` tokens. Everything follows from ``seed``.
    """

    def __init__(self, n: int, image_tokens, text_tokens: tuple[int, int], label_fraction: float, image_size: int,
                 bos_id: int, seed: int, with_pixels: bool = True):
        self.n = n
        self.tokens = image_tokens
        self.label_fraction = label_fraction
        self.image_size = image_size
        self.bos_id = bos_id
        self.seed = seed
        self.with_pixels = with_pixels
        g = torch.Generator().manual_seed(seed)
        lo, hi = text_tokens
        self.text = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        self.span, self.image_hw, self.tiles = bench_image(image_tokens)
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the samples are the same every epoch; a token budget's plan reads it

    def length(self, i: int) -> int:
        return len(self.span) + self.text[i]

    def item_sizes(self) -> list[tuple[int, int]]:
        """``(tokens, images)`` of every sample, as a token-budget sampler plans from them."""
        return [(self.length(i), int(self.with_pixels)) for i in range(self.n)]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        t = self.text[i]
        text = torch.randint(3, self.tokens.original_vocab_size, (t - 1,), generator=g)
        ids = torch.cat([torch.tensor([self.bos_id]), torch.tensor(self.span), text])
        labels = torch.full_like(ids, -100)
        k = int(self.label_fraction * t)
        if k:
            labels[-k:] = ids[-k:]
        if self.with_pixels:
            pixels = torch.randn(self.tiles, 3, self.image_size, self.image_size, generator=g)
        else:
            pixels = torch.zeros(0, 3, self.image_size, self.image_size)
        item = {"input_ids": ids, "labels": labels, "pixel_values": pixels}
        if self.image_hw is not None and self.with_pixels:
            item["image_sizes"] = torch.tensor([self.image_hw])
        return item


def bench_image(image_tokens) -> tuple[list[int], tuple[int, int] | None, int]:
    """(span ids, (height, width), encoder inputs) of the bench's one image per sample.

    Without tiles: the encoder's square, one input. With AnyRes tiles: an image that
    fills the largest grid exactly (for ref-7b with 2x2 tiles of 336 px, 672x672: the
    whole image and four tiles, 2,928 image tokens), so that every sample costs the most.
    """
    anyres = image_tokens.anyres
    if anyres is None:
        return image_tokens.span(), None, 1
    # the most tiles, then the squarest grid (2x2 rather than 4x1), then the most positions
    hw = max(anyres.pinpoints, key=lambda p: (anyres.tiles(p), -abs(p[0] - p[1]), anyres.features(p)))
    return image_tokens.span(image_tokens.count(hw)), tuple(hw), anyres.tiles(hw)


def span_length(image_tokens) -> int:
    """Tokens of the bench image's span (see :func:`bench_image`)."""
    return len(bench_image(image_tokens)[0])


def image_token_layout(model_args):
    """(tokenizer, ImageTokens, image size) exactly as the model builder will make them for ``model_args``."""
    from mmtrain.model.anyres import anyres_layout
    from mmtrain.model.language import load_tokenizer
    from mmtrain.model.tokens import add_image_tokens
    from mmtrain.model.vision import load_vision_config, tower_specs

    vconfig = load_vision_config(model_args.vision_model_name_or_path)
    if model_args.vis_proj == "perceiver":
        per_image = model_args.perceiver_num_queries
    else:
        per_image = (vconfig.image_size // vconfig.patch_size) ** 2
    tokenizer = load_tokenizer(model_args.lm_model_name_or_path)
    anyres = anyres_layout(model_args, tower_specs(model_args)) if model_args.anyres else None
    return tokenizer, add_image_tokens(tokenizer, per_image, anyres=anyres), vconfig.image_size
