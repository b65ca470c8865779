"""AnyRes tiles (LLaVA-NeXT's high resolution): the image processor that tiles, and the packing of tile features.

An image is resized into the pinpoint grid that keeps most of its pixels (padding the
rest), cut into tiles of the encoder's size, and preceded by the whole image squeezed to
one tile. All tiles of a batch go through the frozen encoder and the projector in one
call. Per image, the base tile's features come first; its grid tiles' features are laid
out on the grid, the rows and columns that only saw padding are cut away, and a learned
newline (``projector.image_newline``) ends every feature row. The count of positions is
:meth:`mmtrain.image_tokens.AnyRes.features`, which the data side used to lay out spans.

The tiling itself is transformers' ``LlavaNextImageProcessorPil``, configured from the
tower's own processor (mean, std, resampling): a LLaVA-NeXT export saves that processor,
so plain transformers tiles exactly as training did.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BatchFeature

from mmtrain.image_tokens import AnyRes, parse_pinpoints, tile_grids
from mmtrain.model.errors import ConfigError

NEWLINE = "image_newline"  # the projector's parameter that ends each feature row


def anyres_layout(model_config, specs) -> AnyRes | None:
    """The AnyRes tiling ``model_config`` asks for (None: one fixed square), checked against its towers' ``specs``."""
    if not model_config.anyres:
        return None
    layout = specs[0].layout
    _, height, width = layout.pixel_shape
    if height != width or layout.grid[0] != layout.grid[1]:
        raise ConfigError(
            f"AnyRes tiles need a square encoder input; {specs[0].field} {specs[0].name!r} takes {height}x{width}",
            fields=("image_grid_pinpoints", "anyres_max_tiles", specs[0].field),
        )
    if model_config.anyres_max_tiles:
        pinpoints = tile_grids(model_config.anyres_max_tiles, height)
    else:
        pinpoints = parse_pinpoints(model_config.image_grid_pinpoints)
        wrong = [f"{h}x{w}" for h, w in pinpoints if h % height or w % height]
        if wrong:
            raise ConfigError(
                f"image_grid_pinpoints: {', '.join(wrong)} not a multiple of the encoder's image size {height} "
                f"({specs[0].field} {specs[0].name!r})", fields=("image_grid_pinpoints",),
            )
    return AnyRes(tile=height, side=layout.grid[0], pinpoints=pinpoints)


class AnyResImageProcessor:
    """Images -> ``pixel_values`` ``[tiles, C, S, S]`` (each image's tiles, base first, image after image) and ``image_sizes`` ``[n, 2]``."""

    def __init__(self, tower_processor, anyres: AnyRes):
        from transformers import LlavaNextImageProcessorPil

        self.anyres = self.sized = anyres
        self.tower_processor = tower_processor
        if hasattr(tower_processor, "image_grid_pinpoints"):
            # A LLaVA-NeXT folder's processor tiles by itself: what an export's tower folder keeps
            # is a one-tile processor of the same statistics (the tiling follows from the config).
            self.tower_processor = _one_tile_processor(tower_processor, anyres.tile)
        size = {"height": anyres.tile, "width": anyres.tile}
        self.tiler = LlavaNextImageProcessorPil(
            size=size,
            crop_size=size,
            do_center_crop=False,  # tiles and the resized whole image are already tile-sized
            image_grid_pinpoints=[list(p) for p in anyres.pinpoints],
            resample=getattr(tower_processor, "resample", None),
            rescale_factor=getattr(tower_processor, "rescale_factor", 1 / 255),
            image_mean=getattr(tower_processor, "image_mean", None),
            image_std=getattr(tower_processor, "image_std", None),
            do_normalize=getattr(tower_processor, "do_normalize", True),
        )

    def save_pretrained(self, folder: str, **kwargs):
        """The tower's own processor is what a folder keeps: the tiling follows from the model config."""
        return self.tower_processor.save_pretrained(folder, **kwargs)

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        out = self.tiler(images=images, return_tensors="pt")
        sizes = out["image_sizes"].to(torch.long)
        counts = [self.anyres.tiles(tuple(size.tolist())) for size in sizes]
        pixels = out["pixel_values"]  # [n, most tiles, C, S, S], padded on the tile axis
        tiles = torch.cat([pixels[i, :count] for i, count in enumerate(counts)]) if counts else pixels.reshape(0, *pixels.shape[2:])
        return BatchFeature({"pixel_values": tiles, "image_sizes": sizes}, tensor_type=return_tensors)


def _one_tile_processor(processor, tile: int):
    try:
        from transformers import CLIPImageProcessorPil as OneTile
    except ImportError:  # older transformers: the default class is PIL-backed
        from transformers import CLIPImageProcessor as OneTile
    return OneTile(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, resample=processor.resample,
        rescale_factor=processor.rescale_factor, image_mean=processor.image_mean, image_std=processor.image_std,
        do_normalize=processor.do_normalize,
    )


def add_newline(projector: nn.Module, lm_dim: int, dtype: torch.dtype) -> None:
    """Give ``projector`` the learned newline feature (drawn as transformers' LLaVA-NeXT draws it)."""
    projector.register_parameter(NEWLINE, nn.Parameter(torch.randn(lm_dim, dtype=dtype) / math.sqrt(lm_dim)))


def pack_tiles(projected: torch.Tensor, image_sizes, anyres: AnyRes, newline: torch.Tensor) -> torch.Tensor:
    """Projected tile features ``[tiles, side * side, D]`` -> each image's positions, image after image: ``[positions, D]``.

    ``image_sizes``: each image's ``(height, width)``, a list of pairs (a batch's) or a host tensor ``[n, 2]``.
    """
    side = anyres.side
    sizes = [tuple(s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]
    out, start = [], 0
    for size in sizes:
        rows, cols = anyres.grid(size)
        count = 1 + rows * cols
        tiles = projected[start : start + count]
        start += count
        base, grid = tiles[0], tiles[1:]
        dim = grid.shape[-1]
        # [rows, cols, side, side, D] -> the image's feature plane [rows * side, cols * side, D]
        plane = grid.reshape(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
        keep_rows, keep_cols = anyres.unpadded(size)
        top, left = (plane.shape[0] - keep_rows) // 2, (plane.shape[1] - keep_cols) // 2
        plane = plane[top : top + keep_rows, left : left + keep_cols]
        ends = newline.to(plane.dtype).expand(keep_rows, 1, dim)
        out += [base, torch.cat([plane, ends], dim=1).reshape(-1, dim)]
    if start != projected.shape[0]:
        raise ValueError(f"{projected.shape[0]} tiles given, the {len(sizes)} images' sizes make {start}")
    return torch.cat(out) if out else projected.reshape(0, projected.shape[-1])
