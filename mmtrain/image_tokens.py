"""The image-token contract between data and model: the placeholder a conversation writes and the ids it becomes.

An ``<image>`` placeholder in a conversation becomes ``<im_start>``, then one
``<image>`` token per image feature position, then ``<im_end>``. The model swaps the
embeddings at the ``<image>`` positions for the projected image features, in order, so
image k of a sample always lands on placeholder k. ``<im_start>`` and ``<im_end>`` are
real tokens whose embedding rows train; ``<image>`` rows are never read.

A model started from a LLaVA folder keeps LLaVA's markup (``image_markup`` ``llava``):
the folder's tokenizer already has ``<image>``, which stands alone for every feature
position, and nothing is added; its row is the one new-token row.

With AnyRes tiling (:class:`AnyRes`, LLaVA-NeXT's way) or at its native aspect ratio
(SigLIP2's NaFlex, ``mmtrain.model.native_aspect``) an image's feature positions depend on its size: the base image's features, then its tiles' features unpadded to the
image's aspect ratio with one image-newline position per line. :meth:`ImageTokens.count`
gives that number from the image's original ``(height, width)``, so data and model agree
on it without either asking the other.

A video (``<video>``, on a model with ``video_pool`` set) is its sampled frames, each
encoded at the tower's own resolution and pooled on the patch grid: its span is
``<im_start>``, ``per_frame`` ``<video>`` tokens per frame, ``<im_end>``. Images and videos
keep their own token, so each stream of features is written on its own positions in
order (video k on ``<video>`` span k) and a LLaVA-NeXT-Video export keeps both ids.

``mmtrain.data`` writes placeholders and lays out spans from :class:`ImageTokens`;
``mmtrain.model`` adds the tokens to the tokenizer (:func:`mmtrain.model.tokens.add_image_tokens`)
and swaps the features in. Both import the contract from here; neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN = "<image>"
VIDEO_PLACEHOLDER = "<video>"
VIDEO_TOKEN = "<video>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
NEW_TOKENS = (IMAGE_START, IMAGE_TOKEN, IMAGE_END)
IMAGE_MARKUPS = ("mmtrain", "llava")


@dataclass(frozen=True)
class AnyRes:
    """AnyRes tiling: an image is resized into the best-fitting grid of tiles, plus the whole image as one base tile.

    ``tile`` is the encoder's input side in pixels, ``side`` its patch grid's side (the
    features of one tile are ``side x side``), ``pinpoints`` the grids allowed, as
    ``(height, width)`` in pixels (multiples of ``tile``). The arithmetic is
    transformers' LLaVA-NeXT's (its processor counts the same tokens).
    """

    tile: int
    side: int
    pinpoints: tuple[tuple[int, int], ...]

    def best_resolution(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The pinpoint an image of ``(height, width)`` is resized into (the most of its pixels kept, then the least padding)."""
        # transformers' own choice, so that an export's processor picks the same grid
        from transformers.image_processing_utils import select_best_resolution

        return tuple(select_best_resolution(tuple(image_size), [list(p) for p in self.pinpoints]))

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Tiles per column and per row of an image of ``(height, width)``."""
        height, width = self.best_resolution(image_size)
        return height // self.tile, width // self.tile

    def tiles(self, image_size: tuple[int, int]) -> int:
        """Encoder inputs of one image: the base image and its grid's tiles."""
        rows, cols = self.grid(image_size)
        return 1 + rows * cols

    def unpadded(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Feature rows and columns of the tiles once the padding around the resized image is cut away."""
        height, width = image_size
        rows, cols = self.grid(image_size)
        rows, cols = rows * self.side, cols * self.side
        # The resized image fills the grid along its limiting side and is centred along
        # the other; the features of the bands of padding are dropped (an even split).
        if width / height > cols / rows:
            kept = int(round(height * (cols / width), 7))
            rows -= 2 * ((rows - kept) // 2)
        else:
            kept = int(round(width * (rows / height), 7))
            cols -= 2 * ((cols - kept) // 2)
        return rows, cols

    def features(self, image_size: tuple[int, int]) -> int:
        """Feature positions of one image: the base tile's, then each unpadded row and its newline."""
        rows, cols = self.unpadded(image_size)
        return self.side * self.side + rows * (cols + 1)


def parse_pinpoints(text: str) -> tuple[tuple[int, int], ...]:
    """``"672x336,336x672"`` (height x width, pixels) as pinpoints; raises ValueError naming what is wrong."""
    pinpoints = []
    for item in (t.strip() for t in text.split(",")):
        try:
            height, width = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"{item!r} is not HEIGHTxWIDTH in pixels (e.g. 672x336)") from None
        if height < 1 or width < 1:
            raise ValueError(f"{item!r}: sizes must be positive")
        pinpoints.append((height, width))
    return tuple(pinpoints)


def tile_grids(max_tiles: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Every grid of at most ``max_tiles`` tiles of ``tile`` pixels, as pinpoints (1x1 included)."""
    return tuple((r * tile, c * tile) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles)


@dataclass(frozen=True)
class ImageTokens:
    """Token ids of the image tokens, and how long one image is in the sequence."""

    image_id: int
    start_id: int | None  # None with LLaVA's markup: the image tokens stand alone
    end_id: int | None
    per_image: int  # feature positions of one image (the projector's output length)
    original_vocab_size: int  # the first new token's id: len(tokenizer) before ours were added
    anyres: AnyRes | None = field(default=None)  # tiles: an image's feature count follows its size
    video_id: int | None = field(default=None)  # the <video> token: None when the model reads no videos
    per_frame: int = field(default=0)  # feature positions of one video frame (after pooling)
    # native aspect ratio (mmtrain.model.native_aspect.NativeAspect): each image its own patch grid,
    # the count following its size too; anything with features(size) and tiles(size)
    native: object | None = field(default=None)

    @property
    def sized(self):
        """How an image's token count follows its size (None: every image takes ``per_image``)."""
        return self.anyres or self.native

    def count(self, image_size: tuple[int, int] | None = None) -> int:
        """Feature positions of an image of ``(height, width)``: ``per_image`` unless tiled or at its own aspect."""
        if self.sized is None:
            return self.per_image
        if image_size is None:
            raise ValueError("with AnyRes tiles or native aspect ratios an image's token count needs its size")
        return self.sized.features(image_size)

    @property
    def span_length(self) -> int:
        """Tokens one untiled image occupies: start + features + end (features alone with LLaVA's markup)."""
        return len(self.span())

    def span(self, features: int | None = None) -> list[int]:
        """An image's ids: ``features`` ``<image>`` tokens (default ``per_image``), between start and end in our markup."""
        features = self.per_image if features is None else features
        if self.start_id is None:
            return [self.image_id] * features
        return [self.start_id] + [self.image_id] * features + [self.end_id]

    def video_span(self, frames: int) -> list[int]:
        """A video's ids: ``frames * per_frame`` ``<video>`` tokens, between start and end in our markup."""
        if self.video_id is None:
            raise ValueError("this model reads no videos (its video_pool is 0)")
        body = [self.video_id] * (frames * self.per_frame)
        return body if self.start_id is None else [self.start_id, *body, self.end_id]

    def num_new_rows(self, vocab_size: int) -> int:
        """Embedding rows that are new (trainable): ours three, or LLaVA's image token alone."""
        return 1 if self.start_id is None else vocab_size - self.original_vocab_size

    @property
    def markup(self) -> str:
        """How an image is written: ``<im_start>`` features ``<im_end>`` (mmtrain) or features alone (llava)."""
        return "llava" if self.start_id is None else "mmtrain"
