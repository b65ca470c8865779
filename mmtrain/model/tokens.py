"""The special tokens that carry images through the tokenizer.

An ``<image>`` placeholder in a conversation becomes ``<im_start>``, then one
``<image>`` token per image feature position, then ``<im_end>``. The model swaps the
embeddings at the ``<image>`` positions for the projected image features, in order, so
image k of a sample always lands on placeholder k. ``<im_start>`` and ``<im_end>`` are
real tokens whose embedding rows train; ``<image>`` rows are never read.

A model started from a LLaVA folder keeps LLaVA's markup (``image_markup`` ``llava``):
the folder's tokenizer already has ``<image>``, which stands alone for every feature
position, and nothing is added; its row is the one new-token row.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmtrain.model.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<image>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
NEW_TOKENS = (IMAGE_START, IMAGE_TOKEN, IMAGE_END)
IMAGE_MARKUPS = ("mmtrain", "llava")


@dataclass(frozen=True)
class ImageTokens:
    """Token ids of the image tokens, and how long one image is in the sequence."""

    image_id: int
    start_id: int | None  # None with LLaVA's markup: the image tokens stand alone
    end_id: int | None
    per_image: int  # feature positions of one image (the projector's output length)
    original_vocab_size: int  # the first new token's id: len(tokenizer) before ours were added

    @property
    def span_length(self) -> int:
        """Tokens one image occupies: start + features + end (features alone with LLaVA's markup)."""
        return len(self.span())

    def span(self) -> list[int]:
        if self.start_id is None:
            return [self.image_id] * self.per_image
        return [self.start_id] + [self.image_id] * self.per_image + [self.end_id]

    def num_new_rows(self, vocab_size: int) -> int:
        """Embedding rows that are new (trainable): ours three, or LLaVA's image token alone."""
        return 1 if self.start_id is None else vocab_size - self.original_vocab_size

    @property
    def markup(self) -> str:
        """How an image is written: ``<im_start>`` features ``<im_end>`` (mmtrain) or features alone (llava)."""
        return "llava" if self.start_id is None else "mmtrain"


def add_image_tokens(tokenizer, per_image: int, markup: str = "mmtrain") -> ImageTokens:
    """Add the image tokens to ``tokenizer`` (idempotent) and return their ids.

    With ``markup="llava"`` the tokenizer must already hold ``<image>``; nothing is added.
    A tokenizer without a pad token gets its eos token as pad: padding positions are
    masked out of attention and loss, so the choice never reaches training.
    """
    if markup == "llava":
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ConfigError(f"image_markup 'llava' needs a tokenizer that has {IMAGE_TOKEN!r} (a LLaVA folder's); this one has not")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return ImageTokens(image_id=image_id, start_id=None, end_id=None, per_image=per_image, original_vocab_size=image_id)
    if markup != "mmtrain":
        raise ConfigError(f"--image_markup {markup!r}: valid are {', '.join(IMAGE_MARKUPS)}")
    vocab_before = len(tokenizer)
    missing = [t for t in NEW_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(NEW_TOKENS)})
    else:
        # Already added (a tokenizer saved by an export): the originals are the ids below ours.
        vocab_before = min(tokenizer.convert_tokens_to_ids(t) for t in NEW_TOKENS)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ImageTokens(
        image_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        start_id=tokenizer.convert_tokens_to_ids(IMAGE_START),
        end_id=tokenizer.convert_tokens_to_ids(IMAGE_END),
        per_image=per_image,
        original_vocab_size=vocab_before,
    )
