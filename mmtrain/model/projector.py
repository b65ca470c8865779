"""Projectors: map vision features (width ``vision_dim``) to LM input embeddings (``lm_dim``).

Every projector takes ``[num_images, num_patches, vision_dim]`` and returns
``[num_images, num_tokens, lm_dim]``; ``num_tokens`` is what one image occupies in the
LM's sequence. All accept zero images and still touch all their parameters, which keeps
ZeRO-3's parameter gathering identical on every rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmtrain.model.config import PROJECTORS
from mmtrain.model.errors import ConfigError


class BaselineProjector(nn.Module):
    """Linear + LayerNorm (DeepSpeed-VisualChat's ``baseline``)."""

    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, lm_dim)
        self.norm = nn.LayerNorm(lm_dim)
        self.num_tokens = num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(features))


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear (LLaVA-1.5's ``mlp2x_gelu``; exports to transformers' LLaVA)."""

    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_dim, lm_dim)
        self.num_tokens = num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def _heads_for(width: int) -> int:
    """Attention heads of a projector block: heads of width 64-128 where the width allows."""
    for head_dim in (128, 64, 32, 16, 8):
        if width % head_dim == 0 and width // head_dim >= 1:
            return width // head_dim
    return 1


class ViTProjector(nn.Module):
    """One pre-norm transformer encoder layer over the patches, then Linear + LayerNorm."""

    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(
            d_model=vision_dim,
            nhead=_heads_for(vision_dim),
            dim_feedforward=4 * vision_dim,
            activation="gelu",
            batch_first=True,
            norm_first=True,
            dropout=0.0,
        )
        self.proj = nn.Linear(vision_dim, lm_dim)
        self.norm = nn.LayerNorm(lm_dim)
        self.num_tokens = num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # nn.TransformerEncoderLayer's fast path rejects empty batches; the slow path is fine.
        return self.norm(self.proj(self.block(features)))


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """Fixed 1-D sine/cosine position table ``[length, width]`` (never trained)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: width // 2])
    return table


class PerceiverProjector(nn.Module):
    """A fixed number of learned queries cross-attending to the patch features.

    Works in the LM's width (as Qwen-VL's resampler, which DeepSpeed-VisualChat uses):
    features are projected to ``lm_dim``, a fixed sinusoidal position table is added to
    the keys, and ``num_queries`` learned queries attend to them. Every image becomes
    ``num_queries`` tokens whatever its patch count.
    """

    def __init__(self, vision_dim: int, lm_dim: int, num_patches: int, num_queries: int):
        super().__init__()
        self.kv_proj = nn.Linear(vision_dim, lm_dim, bias=False)
        self.queries = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.02)
        self.register_buffer("key_positions", sinusoidal_positions(num_patches, lm_dim), persistent=False)
        self.register_buffer("query_positions", sinusoidal_positions(num_queries, lm_dim), persistent=False)
        self.ln_q = nn.LayerNorm(lm_dim)
        self.ln_kv = nn.LayerNorm(lm_dim)
        self.attn = nn.MultiheadAttention(lm_dim, _heads_for(lm_dim), batch_first=True)
        self.ln_post = nn.LayerNorm(lm_dim)
        self.num_tokens = num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(features))
        q = self.ln_q(self.queries)[None].expand(features.shape[0], -1, -1)
        out, _ = self.attn(
            q + self.query_positions.to(q.dtype), kv + self.key_positions.to(kv.dtype), kv, need_weights=False
        )
        return self.ln_post(out)


def build_projector(kind: str, vision_dim: int, lm_dim: int, num_patches: int, num_queries: int = 64) -> nn.Module:
    """The projector named by the config's ``vis_proj``."""
    if kind == "baseline":
        return BaselineProjector(vision_dim, lm_dim, num_patches)
    if kind == "mlp":
        return MLPProjector(vision_dim, lm_dim, num_patches)
    if kind == "vit":
        return ViTProjector(vision_dim, lm_dim, num_patches)
    if kind == "perceiver":
        return PerceiverProjector(vision_dim, lm_dim, num_patches, num_queries)
    raise ConfigError(f"vis_proj {kind!r} is not a projector; valid: {', '.join(PROJECTORS)}", fields=("vis_proj",))
