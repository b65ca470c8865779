"""The special tokens that carry images through the tokenizer.

An ``<image>`` placeholder in a conversation becomes ``<im_start>``, then one
``<image>`` token per image feature position, then ``<im_end>``. The model swaps the
embeddings at the ``<image>`` positions for the projected image features, in order, so
image k of a sample always lands on placeholder k. ``<im_start>`` and ``<im_end>`` are
real tokens whose embedding rows train; ``<image>`` rows are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<image>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
NEW_TOKENS = (IMAGE_START, IMAGE_TOKEN, IMAGE_END)


@dataclass(frozen=True)
class ImageTokens:
    """Token ids of the image tokens, and how long one image is in the sequence."""

    image_id: int
    start_id: int
    end_id: int
    per_image: int  # feature positions of one image (the projector's output length)
    original_vocab_size: int  # len(tokenizer) before the new tokens were added

    @property
    def span_length(self) -> int:
        """Tokens one image occupies: start + features + end."""
        return self.per_image + 2

    def span(self) -> list[int]:
        return [self.start_id] + [self.image_id] * self.per_image + [self.end_id]


def add_image_tokens(tokenizer, per_image: int) -> ImageTokens:
    """Add the image tokens to ``tokenizer`` (idempotent) and return their ids.

    A tokenizer without a pad token gets its eos token as pad: padding positions are
    masked out of attention and loss, so the choice never reaches training.
    """
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
