"""Decoding what a sample shows into the encoder's inputs: images to pixel values, videos to their sampled frames.

An image is a file path, a tar shard's member, or an image embedded in a dataset's rows,
read back through an :class:`~mmtrain.data.images.ImageStore`. A video is a clip file
(decoded with PyAV) or a list of frame images (:mod:`mmtrain.data.video`). Every failure
is a :class:`BadImageError` naming the data file and record.
"""

from __future__ import annotations

import torch
from PIL import Image

from mmtrain.data.formats import BadImageError
from mmtrain.data.images import ImageStore, describe, parse_embedded
from mmtrain.data.tar_shards import open_member
from mmtrain.data.video import BadVideoError, decode_clip, describe_video, frame_list, sample_indices

__all__ = [
    "BadImageError", "decode_images", "decode_videos", "image_shape", "image_size", "load_images", "pixel_inputs", "video_inputs",
]


def load_images(
    images: list[tuple[str, str, int]], image_processor, empty_shape: tuple[int, int, int], store: ImageStore | None = None
) -> torch.Tensor:
    """Decode ``(image, source file, record index)`` images and preprocess them to ``[n, 3, H, W]``.

    An image is a file path, a tar shard's member, or an image embedded in a dataset's
    rows, read back through ``store`` (:mod:`mmtrain.data.images`).
    """
    return pixel_inputs(decode_images(images, store), image_processor, empty_shape)["pixel_values"]


def decode_images(images: list[tuple[str, str, int]], store: ImageStore | None = None) -> list[Image.Image]:
    """The ``(image, source file, record index)`` images decoded (RGB); raises :class:`BadImageError` naming the record."""
    return [_decode(path, source, index, store) for path, source, index in images]


def pixel_inputs(decoded: list[Image.Image], image_processor, empty_shape: tuple[int, int, int]) -> dict:
    """``{"pixel_values"}`` of decoded images, and their ``"image_sizes"`` when the processor tiles them (AnyRes)."""
    if not decoded:
        out = {"pixel_values": torch.zeros((0, *empty_shape), dtype=torch.float32)}
        if getattr(image_processor, "sized", None) is not None:  # tiles or native aspect: sizes travel with the pixels
            out["image_sizes"] = torch.zeros((0, 2), dtype=torch.long)
        return out
    processed = image_processor(images=decoded, return_tensors="pt")
    out = {"pixel_values": processed["pixel_values"].to(torch.float32)}
    if "image_sizes" in processed:
        out["image_sizes"] = processed["image_sizes"].to(torch.long)
    return out


def image_size(path: str, source: str, index: int, store: ImageStore | None = None) -> tuple[int, int]:
    """An image's ``(height, width)`` from its header, without decoding its pixels (tiles count tokens from it)."""
    return _read(path, source, index, store, lambda image: (image.height, image.width))


def _decode(path: str, source: str, index: int, store: ImageStore | None) -> Image.Image:
    return _read(path, source, index, store, lambda image: image.convert("RGB"))


def _read(path: str, source: str, index: int, store: ImageStore | None, take):
    """``take(image)`` of an opened image; a missing or unreadable one is a :class:`BadImageError` naming the record."""
    what = f"image file {path}"
    try:
        if parse_embedded(path) is not None:
            what = f"{describe(path)} (embedded)"
            opened = (store or ImageStore()).open(path)
        else:
            opened = open_member(path) or path  # a tar shard's member, or a file
        if isinstance(opened, Image.Image):
            return take(opened)
        with Image.open(opened) as image:
            return take(image)
    except FileNotFoundError:
        raise BadImageError(f"{source}: record {index}: {what} not found") from None
    except (OSError, ValueError, IndexError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{source}: record {index}: {what} cannot be decoded: {err}") from None


def decode_videos(videos: list[tuple[str, str, int]], max_frames: int, fps: float = 0.0, store: ImageStore | None = None) -> list[list[Image.Image]]:
    """The sampled frames of each ``(video, source file, record index)``; raises :class:`BadVideoError` naming the record."""
    decoded = []
    for video, source, index in videos:
        frames = frame_list(video)
        if frames is None:
            decoded.append(decode_clip(video, f"{source}: record {index}", max_frames, fps))
            continue
        try:
            decoded.append(decode_images([(frames[k], source, index) for k in sample_indices(len(frames), max_frames)], store))
        except BadImageError as err:
            raise BadVideoError(f"{err} ({describe_video(video)})") from None
    return decoded


def video_inputs(decoded: list[list[Image.Image]], image_processor) -> dict:
    """``{"pixel_values_videos", "video_frames"}`` of decoded videos (empty when none): frames at the tower's own size, never tiled."""
    if not decoded:
        return {}
    frame_processor = getattr(image_processor, "tower_processor", image_processor)  # AnyRes tiles images only
    frames = [frame for video in decoded for frame in video]
    pixels = frame_processor(images=frames, return_tensors="pt")["pixel_values"].to(torch.float32)
    return {"pixel_values_videos": pixels, "video_frames": torch.tensor([len(v) for v in decoded], dtype=torch.long)}


def image_shape(image_processor) -> tuple[int, int, int]:
    """The [3, H, W] the processor produces (for the empty pixel tensor of text-only samples)."""
    return tuple(image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"].shape[1:])
