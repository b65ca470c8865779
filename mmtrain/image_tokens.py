"""The image-token contract between data and model: the placeholder a conversation writes and the ids it becomes.

An ``<image>`` placeholder in a conversation becomes ``<im_start>``, then one
``<image>`` token per image feature position, then ``<im_end>``. The model swaps the
embeddings at the ``<image>`` positions for the projected image features, in order, so
image k of a sample always lands on placeholder k. ``<im_start>`` and ``<im_end>`` are
real tokens whose embedding rows train; ``<image>`` rows are never read.

A model started from a LLaVA folder keeps LLaVA's markup (``image_markup`` ``llava``):
the folder's tokenizer already has ``<image>``, which stands alone for every feature
position, and nothing is added; its row is the one new-token row.

``mmtrain.data`` writes placeholders and lays out spans from :class:`ImageTokens`;
``mmtrain.model`` adds the tokens to the tokenizer (:func:`mmtrain.model.tokens.add_image_tokens`)
and swaps the features in. Both import the contract from here; neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
