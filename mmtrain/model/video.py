"""Video frames on the model side: each frame's patch features average-pooled on the patch grid before the projector.

A video reaches the model as its sampled frames, each at the encoder's own image size
(never AnyRes tiles). The frames go through the vision encoder with the batch's images,
in one call; their patch features are laid back on the patch grid, average-pooled
``k x k`` (``video_pool``; the floor of ``side / k`` pooled cells per side, as
``nn.AvgPool2d`` gives), and projected. That is LLaVA-NeXT-Video's order (its
``vision_resampler`` pools before its ``multi_modal_projector``), so an export computes
the same numbers. A video's span is its frames times :func:`frame_positions`.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtrain.model.errors import ConfigError


def patch_grid(vision) -> tuple[int, int]:
    """The encoder's patch grid (rows, columns); fused towers share theirs."""
    return vision.parts[0].layout.grid


def check_video_grid(config, specs) -> None:
    """Refuse, from the towers' layouts alone, a pooling window larger than the patch grid."""
    if config.video_pool <= 1:
        return
    rows, cols = specs[0].layout.grid
    if min(rows, cols) < config.video_pool:
        raise ConfigError(
            f"video_pool {config.video_pool} is larger than the {rows}x{cols} patch grid of {specs[0].field} {specs[0].name!r}",
            fields=("video_pool", specs[0].field),
        )


def frame_positions(video_pool: int, vision, projector: nn.Module) -> int:
    """Positions one video frame takes: the projector's tokens unpooled, else the pooled grid's cells (0: no videos)."""
    if video_pool == 0:
        return 0
    if video_pool == 1:
        return projector.num_tokens
    rows, cols = patch_grid(vision)
    return (rows // video_pool) * (cols // video_pool)


def pool_frames(features: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Patch features ``[frames, rows * cols, D]`` average-pooled ``k x k`` on their grid: ``[frames, (rows // k) * (cols // k), D]``."""
    if k == 1:
        return features
    frames, _, dim = features.shape
    rows, cols = grid
    plane = features.reshape(frames, rows, cols, dim).permute(0, 3, 1, 2)
    pooled = nn.functional.avg_pool2d(plane, kernel_size=k, stride=k)
    return pooled.flatten(2).transpose(1, 2)
