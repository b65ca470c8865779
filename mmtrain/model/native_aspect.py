"""SigLIP2's NaFlex processors: at the tower's fixed grid, or each image at its own aspect ratio.

Native aspect ratio: each image at its own patch grid, up to a patch budget.
An image is resized, keeping its aspect ratio, to the largest grid of at most
``--vision_max_patches`` patches (SigLIP2's own processor decides), and the tower reads its
patches with the position embeddings resized to that grid (the tower's ``spatial_shapes``
input). Its features are its own grid's patches, row after row:
:meth:`mmtrain.image_tokens.NativeAspect.features` positions, which the data side counts
from the image's size before training.

Batches carry each image's patch rows padded to the budget (as the processor gives them)
and the images' sizes on the host; the grids, the padding mask and ``spatial_shapes`` are
made from those sizes here, so nothing is read back from the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoImageProcessor, BatchFeature

from mmtrain import presets
from mmtrain.compat import transformers as hf_compat
from mmtrain.model.errors import ConfigError

FIELD = "vision_max_patches"


@dataclass(frozen=True)
class NativeAspect:
    """Native aspect ratio (SigLIP2's NaFlex): an image resized, keeping its aspect ratio, to at most ``max_patches`` patches.

    One encoder input per image; its features are its own grid of patches, row after row.
    The resize is transformers' SigLIP2 processor's (the processor that makes the patches).
    """

    patch: int
    max_patches: int

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch rows and columns of an image of ``(height, width)``."""
        height, width = hf_compat.naflex_size(image_size[0], image_size[1], self.patch, self.max_patches)
        return height // self.patch, width // self.patch

    def tiles(self, image_size: tuple[int, int]) -> int:
        return 1

    def features(self, image_size: tuple[int, int]) -> int:
        rows, cols = self.grid(image_size)
        return rows * cols


def fixed_grid_processor(processor, config):
    """A SigLIP2 (NaFlex) processor as a fixed-size one: resize to the tower's own grid, same normalisation.

    NaFlex picks each image's grid from its aspect ratio; at a fixed resolution every
    image is resized to ``side x side`` patches, ``side = sqrt(num_patches)`` (the
    position-embedding grid the tower was trained with), as fixed-resolution SigLIP is.
    """
    from transformers import SiglipImageProcessorPil

    side = math.isqrt(config.num_patches)
    if side * side != config.num_patches:
        raise ConfigError(f"{type(config).__name__}: num_patches {config.num_patches} is not a square grid")
    size = side * config.patch_size
    return SiglipImageProcessorPil(
        size={"height": size, "width": size},
        resample=getattr(processor, "resample", None) or Image.Resampling.BILINEAR,
        rescale_factor=getattr(processor, "rescale_factor", 1 / 255),
        image_mean=getattr(processor, "image_mean", [0.5, 0.5, 0.5]),
        image_std=getattr(processor, "image_std", [0.5, 0.5, 0.5]),
    )


def native_layout(model_config, specs) -> NativeAspect | None:
    """The native-aspect layout ``model_config`` asks for (None: the tower's fixed grid), checked against its tower."""
    if not model_config.vision_max_patches:
        return None
    spec = specs[0]
    if not spec.layout.patchified:
        raise ConfigError(
            f"{FIELD} {model_config.vision_max_patches}: {spec.field} {spec.name!r} is a {type(spec.config).__name__}, which "
            "reads one fixed image size; native aspect ratios need a tower that takes patch rows and their grid (SigLIP2)",
            fields=(FIELD, spec.field),
        )
    return NativeAspect(patch=spec.config.patch_size, max_patches=model_config.vision_max_patches)


class NativeAspectProcessor:
    """Images -> ``pixel_values`` ``[n, max_patches, patch * patch * C]`` (each padded) and ``image_sizes`` ``[n, 2]``."""

    def __init__(self, name: str, native: NativeAspect):
        self.sized = native
        if presets.is_preset(name):  # a preset tower's processor is drawn up, as its fixed-grid one is
            from transformers import Siglip2ImageProcessorPil

            self.patcher = Siglip2ImageProcessorPil(patch_size=native.patch, max_num_patches=native.max_patches)
        else:
            self.patcher = AutoImageProcessor.from_pretrained(name)  # the tower's own NaFlex processor
        if not hasattr(self.patcher, "max_num_patches"):
            raise ConfigError(f"{FIELD}: the image processor of {name!r} is no NaFlex processor (it has no max_num_patches)", fields=(FIELD,))

    def save_pretrained(self, folder: str, **kwargs):
        return self.patcher.save_pretrained(folder, **kwargs)

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        out = self.patcher(images=images, max_num_patches=self.sized.max_patches, return_tensors="pt")
        sizes = torch.tensor([(image.height, image.width) for image in images], dtype=torch.long).reshape(-1, 2)
        grids = [self.sized.grid(tuple(s)) for s in sizes.tolist()]
        if out["spatial_shapes"].tolist() != [list(g) for g in grids]:
            raise RuntimeError(f"the processor's grids {out['spatial_shapes'].tolist()} are not the counted ones {grids}")
        return BatchFeature({"pixel_values": out["pixel_values"].to(torch.float32), "image_sizes": sizes}, tensor_type=return_tensors)


def native_inputs(pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> dict:
    """The tower's inputs for patch rows padded to one length: the padding mask and each image's grid."""
    n, length = pixel_values.shape[:2]
    device = pixel_values.device
    spatial = torch.tensor(grids, dtype=torch.long).reshape(n, 2)
    mask = torch.arange(length)[None, :] < (spatial[:, 0] * spatial[:, 1])[:, None]
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask.to(device), "spatial_shapes": spatial.to(device)}


def valid_rows(features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """Each image's own patches' features, image after image: ``[positions, D]`` from ``[n, max_patches, D]``."""
    if not grids:
        return features.reshape(0, features.shape[-1])
    return torch.cat([features[i, : r * c] for i, (r, c) in enumerate(grids)])
