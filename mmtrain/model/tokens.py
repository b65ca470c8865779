"""Adding the image tokens to a tokenizer (the contract itself is :mod:`mmtrain.image_tokens`)."""

from __future__ import annotations

from mmtrain.image_tokens import IMAGE_END, IMAGE_MARKUPS, IMAGE_START, IMAGE_TOKEN, NEW_TOKENS, VIDEO_TOKEN, AnyRes, ImageTokens
from mmtrain.model.errors import ConfigError


def add_image_tokens(
    tokenizer, per_image: int, markup: str = "mmtrain", anyres: AnyRes | None = None, native=None, per_frame: int = 0
) -> ImageTokens:
    """Add the image tokens to ``tokenizer`` (idempotent) and return their ids.

    With ``markup="llava"`` the tokenizer must already hold ``<image>``; nothing is added.
    A tokenizer without a pad token gets its eos token as pad: padding positions are
    masked out of attention and loss, so the choice never reaches training.
    ``anyres``: images are tiled; ``native``: read at their own aspect ratio. Either way each
    image's token count follows its size. ``per_frame`` > 0: the model reads videos;
    ``<video>`` is added after ours, and each frame takes that many positions.
    """
    if markup == "llava":
        if per_frame:
            raise ConfigError("videos from a LLaVA folder are not supported yet", fields=("video_pool", "vlm_name_or_path"))
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ConfigError(f"image_markup 'llava' needs a tokenizer that has {IMAGE_TOKEN!r} (a LLaVA folder's); this one has not")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return ImageTokens(image_id=image_id, start_id=None, end_id=None, per_image=per_image, original_vocab_size=image_id, anyres=anyres, native=native)
    if markup != "mmtrain":
        raise ConfigError(f"image_markup {markup!r}: valid are {', '.join(IMAGE_MARKUPS)}", fields=("image_markup",))
    vocab_before = len(tokenizer)
    wanted = NEW_TOKENS + ((VIDEO_TOKEN,) if per_frame else ())
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing and len(missing) < len(wanted):
        raise ConfigError(f"the tokenizer holds some of mmtrain's tokens but not {', '.join(missing)}", fields=("video_pool",))
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(wanted)})
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
        anyres=anyres,
        native=native,
        video_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) if per_frame else None,
        per_frame=per_frame,
    )
