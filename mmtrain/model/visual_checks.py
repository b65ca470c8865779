"""The checks of a model config's visual inputs: AnyRes tiles, native aspect ratios and videos (fields named, no weights read)."""

from __future__ import annotations

from mmtrain.model.errors import ConfigError

ANYRES_PROJECTORS = ("mlp", "baseline", "vit")  # one output feature per input patch (the perceiver makes its own)
NATIVE_PROJECTORS = ("mlp", "baseline")  # token by token: any number of patches per image


def check_visual_inputs(config) -> None:
    """Refuse, naming the fields, what tiles, native aspect ratios or videos cannot do with ``config`` (a ``VLMConfig``)."""
    _check_anyres(config)
    _check_video(config)


def _check_anyres(config) -> None:
    named = ("image_grid_pinpoints", "anyres_max_tiles")
    if config.image_grid_pinpoints and config.anyres_max_tiles:
        raise ConfigError("image_grid_pinpoints and anyres_max_tiles both choose the tile grids; set one", fields=named)
    if config.anyres_max_tiles < 0:
        raise ConfigError(f"anyres_max_tiles must be >= 0, got {config.anyres_max_tiles}", fields=("anyres_max_tiles",))
    if config.image_grid_pinpoints:
        from mmtrain.image_tokens import parse_pinpoints

        try:
            parse_pinpoints(config.image_grid_pinpoints)
        except ValueError as e:
            raise ConfigError(f"image_grid_pinpoints {config.image_grid_pinpoints!r}: {e}", fields=("image_grid_pinpoints",)) from None
    if config.vision_max_patches:
        _check_native(config)
    if not config.anyres:
        return
    # Tiles are laid out on their patch grid: each projected feature must stay one patch.
    if config.vis_proj not in ANYRES_PROJECTORS:
        why = "the perceiver makes its own number of tokens"
        raise ConfigError(
            f"AnyRes tiles need a projector that keeps one feature per patch ({', '.join(ANYRES_PROJECTORS)}), and with "
            f"vis_proj {config.vis_proj!r} {why}", fields=(*named, "vis_proj"),
        )
    if config.vision_keep_cls:
        raise ConfigError("AnyRes tiles lay features out on the patch grid, and a CLS token is no patch", fields=(*named, "vision_keep_cls"))
    if config.vision_model_name_or_path_2:
        raise ConfigError(
            "AnyRes tiles with two fused encoders are not supported: each tile would need both image processors' crops",
            fields=(*named, "vision_model_name_or_path_2"),
        )

def _check_native(config) -> None:
    named = ("vision_max_patches",)
    if config.vision_max_patches < 0:
        raise ConfigError(f"vision_max_patches must be >= 0, got {config.vision_max_patches}", fields=named)
    if config.anyres:
        raise ConfigError(
            "vision_max_patches reads each image at its own aspect ratio, AnyRes tiles cut it into a grid: pick one",
            fields=(*named, "anyres_max_tiles", "image_grid_pinpoints"),
        )
    if config.vis_proj not in NATIVE_PROJECTORS:
        raise ConfigError(
            f"vision_max_patches: images of different patch counts go through the projector token by token "
            f"({', '.join(NATIVE_PROJECTORS)}), which vis_proj {config.vis_proj!r} is not", fields=(*named, "vis_proj"),
        )
    for other, why in (("vision_model_name_or_path_2", "two fused towers share one fixed grid"), ("vlm_name_or_path", "a LLaVA folder's tower reads one fixed size")):
        if getattr(config, other):
            raise ConfigError(f"vision_max_patches cannot be used with {other}: {why}", fields=(*named, other))

def _check_video(config) -> None:
    if config.video_pool < 0:
        raise ConfigError(f"video_pool must be >= 0 (0: no videos), got {config.video_pool}", fields=("video_pool",))
    if not config.video_pool:
        return
    if config.vision_max_patches:
        raise ConfigError(
            "videos with vision_max_patches are not supported: frames go through the encoder at its own fixed size",
            fields=("video_pool", "vision_max_patches"),
        )
    if config.vlm_name_or_path:
        raise ConfigError(
            "videos from a LLaVA folder are not supported yet: start from its parts (its vision tower and LM folders)",
            fields=("video_pool", "vlm_name_or_path"),
        )
    if config.enable_mmca_attention:
        raise ConfigError("MMCA attention knows image spans only, not video spans", fields=("video_pool", "enable_mmca_attention"))
    if config.video_pool > 1:
        # Pooling works on the patch grid: each projected feature must stay one (pooled) patch.
        if config.vis_proj not in ANYRES_PROJECTORS:
            raise ConfigError(
                f"video_pool {config.video_pool} pools the patch grid, and the {config.vis_proj!r} projector makes its own "
                f"number of tokens (pooling works with {', '.join(ANYRES_PROJECTORS)}; or set video_pool 1)",
                fields=("video_pool", "vis_proj"),
            )
        if config.vision_keep_cls:
            raise ConfigError(
                f"video_pool {config.video_pool} pools the patch grid, and a CLS token is no patch", fields=("video_pool", "vision_keep_cls")
            )

