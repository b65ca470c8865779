"""The vision encoder: a Hugging Face vision transformer read at one hidden layer, or two fused.

Any transformers vision backbone whose config has ``hidden_size``, ``num_hidden_layers``
and ``patch_size`` and whose model returns ``hidden_states`` of one token per patch,
after a few leading tokens, is a tower: CLIP, SigLIP, SigLIP2 (at a fixed resolution),
DINOv2 with or without registers, ViT, BEiT, DeiT... Nothing is decided by a name:

* the pixel size is what the tower's image processor gives (DINOv2's config says 518 px,
  its processor crops 224);
* the leading tokens are counted by running the tower once on the meta device (no
  memory, no weights) at that size: ``tokens - patches``. The first is the CLS token
  (kept with ``--vision_keep_cls``); ``num_register_tokens`` of the config says how many
  are registers, which are always dropped, as is any other leading token (DeiT's
  distillation token);
* a tower whose forward takes patch rows, a patch mask and the grid instead of an image
  (SigLIP2's, built for NaFlex) gets them made here for one fixed grid: the side of its
  position-embedding grid (``sqrt(num_patches)``), so no position embedding is resized.

Two towers with the same patch grid can be fused (prismatic's DINOv2 + SigLIP): each
image goes through both image processors, the two pixel tensors travel stacked on the
channel axis (padded to the larger size), and the features are concatenated per patch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import (
    MODEL_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    BatchFeature,
    CLIPConfig,
    PretrainedConfig,
    SiglipConfig,
    Siglip2Config,
    Siglip2VisionConfig,
)

from mmtrain import presets
from mmtrain.model.errors import ConfigError
from mmtrain.model.hf_loading import checked_from_pretrained
from mmtrain.model.native_aspect import fixed_grid_processor, native_inputs

FIELD, FIELD_2 = "vision_model_name_or_path", "vision_model_name_or_path_2"  # the config fields naming the towers
# Full checkpoints (text + vision): their vision half is taken.
COMPOSITE_CONFIGS = (CLIPConfig, SiglipConfig, Siglip2Config)
# Towers whose forward takes patch rows + pixel_attention_mask + spatial_shapes.
PATCHIFIED_CONFIGS = (Siglip2VisionConfig,)
_REQUIRED = ("hidden_size", "num_hidden_layers", "patch_size")
SUPPORTED = (
    "vision transformers whose config has hidden_size, num_hidden_layers and patch_size and whose model returns "
    "hidden_states with one token per patch (CLIP, SigLIP, SigLIP2, DINOv2, DINOv2 with registers, ViT, ...)"
)


def load_vision_config(name_or_path: str, field: str = FIELD) -> PretrainedConfig:
    """The vision tower's config, from a preset or a folder; what cannot be a tower fails here."""
    if presets.is_preset(name_or_path):
        config = presets.preset_config(name_or_path)
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field} {name_or_path!r}: cannot read a Hugging Face config: {e}", fields=(field,)) from None
    if isinstance(config, COMPOSITE_CONFIGS):
        config = config.vision_config
    missing = [k for k in _REQUIRED if not isinstance(getattr(config, k, None), int)]
    if missing or type(config) not in MODEL_MAPPING:
        why = f"no {', '.join(missing)}" if missing else "no transformers AutoModel class"
        raise ConfigError(f"{field} {name_or_path!r} holds a {type(config).__name__} ({why}); supported: {SUPPORTED}", fields=(field,))
    return config


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower's patch features are: pixel size, patch grid, and the tokens before the patches."""

    pixel_shape: tuple[int, int, int]  # [C, H, W] its image processor gives
    grid: tuple[int, int]  # patches per column and row
    prefix_tokens: int  # tokens before the patches (CLS first, then registers or others)
    registers: int  # of which registers (num_register_tokens)
    patchified: bool  # forward takes patch rows + mask + grid (SigLIP2)

    @property
    def has_cls(self) -> bool:
        return self.prefix_tokens > self.registers

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


_LAYOUTS: dict[tuple, TowerLayout] = {}


def tower_layout(config: PretrainedConfig, pixel_shape: tuple[int, int, int], name: str, field: str = FIELD) -> TowerLayout:
    """The layout of ``config``'s tower at ``pixel_shape``, measured on the meta device (cached)."""
    key = (type(config), config.to_json_string(), tuple(pixel_shape))
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    channels, height, width = pixel_shape
    patch = config.patch_size
    if height % patch or width % patch:
        problem = f"its image processor gives {height}x{width} images, not a multiple of the patch size {patch}"
        raise ConfigError(f"{field} {name!r}: {problem}", fields=(field,))
    grid = (height // patch, width // patch)
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    patchified = isinstance(config, PATCHIFIED_CONFIGS)
    if patchified:
        layout = TowerLayout(tuple(pixel_shape), grid, 0, 0, True)
    else:
        probe = copy.deepcopy(config)
        probe.num_hidden_layers = 1  # the token count does not depend on the depth
        try:
            # The class itself, not AutoModel.from_config: that one builds under
            # deepspeed.zero.Init once a ZeRO-3 run has begun, which a meta probe must not.
            with torch.device("meta"):
                tower = MODEL_MAPPING[type(config)](probe)
                out = tower(pixel_values=torch.empty(1, *pixel_shape), output_hidden_states=True)
        except Exception as e:  # whatever the tower raises, the message names it and the field
            raise ConfigError(
                f"{field} {name!r}: {type(config).__name__}'s model cannot run on {height}x{width} images from its "
                f"image processor: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", fields=(field,)
            ) from None
        states = getattr(out, "hidden_states", None)
        last = states[-1] if states else None
        if last is None or last.dim() != 3 or last.shape[1] < grid[0] * grid[1] + registers:
            shape = None if last is None else tuple(last.shape)
            raise ConfigError(
                f"{field} {name!r}: {type(tower).__name__} returns hidden_states of shape {shape}, not "
                f"[images, tokens, width] with {grid[0]}x{grid[1]} patch tokens; supported: {SUPPORTED}", fields=(field,)
            )
        layout = TowerLayout(tuple(pixel_shape), grid, last.shape[1] - grid[0] * grid[1], registers, False)
    _LAYOUTS[key] = layout
    return layout


def processor_pixel_shape(image_processor, name: str, field: str) -> tuple[int, int, int]:
    """The [C, H, W] ``image_processor`` gives; it must not depend on the image."""
    shapes = {
        tuple(image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["pixel_values"].shape[1:])
        for size in ((8, 8), (24, 8))
    }
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        problem = f"its image processor gives images of shapes {sorted(shapes)}; mmtrain needs one fixed [C, H, W]"
        raise ConfigError(f"{field} {name!r}: {problem}", fields=(field,))
    return next(iter(shapes))


def load_image_processor_for(name: str, config: PretrainedConfig, field: str = FIELD):
    """The tower's own image processor (a preset's is built), fixed to one size."""
    if presets.is_preset(name):
        return presets.build_preset_image_processor(config)
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field} {name!r} has no image processor (preprocessor_config.json): {e}", fields=(field,)) from None
    if isinstance(config, PATCHIFIED_CONFIGS) and hasattr(processor, "max_num_patches"):
        processor = fixed_grid_processor(processor, config)
    return processor


@dataclass
class TowerSpec:
    """One tower as the model config names it: its config, image processor and layout (no weights)."""

    name: str
    field: str  # the config field that names it
    config: PretrainedConfig
    image_processor: object
    layout: TowerLayout


def tower_specs(model_config) -> list[TowerSpec]:
    """The one or two towers ``model_config`` names; fused towers whose grids differ fail here."""
    specs = []
    for name, field in ((model_config.vision_model_name_or_path, FIELD), (model_config.vision_model_name_or_path_2, FIELD_2)):
        if not name:
            continue
        config = load_vision_config(name, field)
        processor = load_image_processor_for(name, config, field)
        specs.append(TowerSpec(name, field, config, processor, tower_layout(config, processor_pixel_shape(processor, name, field), name, field)))
    if len(specs) == 2:
        a, b = specs
        if a.layout.grid != b.layout.grid:
            raise ConfigError(
                f"{a.field} {a.name!r} gives a {a.layout.grid[0]}x{a.layout.grid[1]} patch grid and {b.field} {b.name!r} a "
                f"{b.layout.grid[0]}x{b.layout.grid[1]} one: fused features need the same grid (image size / patch size)", fields=(a.field, b.field)
            )
        if model_config.vision_keep_cls:
            problem = "fused features are concatenated per patch, and a CLS token is no patch"
            raise ConfigError(f"vision_keep_cls cannot be used with {FIELD_2}: {problem}", fields=("vision_keep_cls", FIELD_2))
    return specs


class VisionEncoder(nn.Module):
    """A vision tower that returns the patch features of one hidden layer.

    ``feature_layer`` indexes ``hidden_states`` (LLaVA reads -2, the second to last);
    the leading tokens are dropped, except the CLS token with ``keep_cls``.
    """

    def __init__(self, tower: nn.Module, feature_layer: int, keep_cls: bool, layout: TowerLayout):
        super().__init__()
        self.tower = tower
        self.layout = layout
        self.has_cls = layout.has_cls
        self.keep_cls = keep_cls and layout.has_cls
        self.drop_cls = layout.has_cls and not keep_cls
        self.prefix_tokens = layout.prefix_tokens
        config = tower.config
        layers = config.num_hidden_layers
        if not -(layers + 1) <= feature_layer <= layers:
            where = f"outside [-{layers + 1}, {layers}] for this {layers}-layer encoder"
            raise ConfigError(f"vision_feature_layer {feature_layer} is {where}", fields=("vision_feature_layer",))
        # Layers after the one we read are dead weight: dropping them saves their compute
        # and memory, and leaves no LoRA adapter without a gradient. hidden_states[i] is
        # the output of layer i (0: the embeddings), so keeping layers[:i] and reading the
        # last hidden state gives the same features.
        keep = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer
        layer_list = encoder_layers(tower)
        # (reading the embeddings, layer 0, keeps one layer: a tower with none returns no hidden states)
        if max(keep, 1) < len(layer_list):
            del layer_list[max(keep, 1) :]
            config.num_hidden_layers = max(keep, 1)
            if hasattr(config, "stage_names"):
                # Backbone configs (DINOv2, ViT...) name a stage per layer, and their saved
                # output stage must be one of them for the folder to load again.
                config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, config.num_hidden_layers + 1)]
                config.set_output_features_output_indices(out_features=None, out_indices=None)
        self.feature_layer = -1 if keep > 0 else 0
        self.hidden_size = config.hidden_size
        self.num_patches = layout.patches + (1 if self.keep_cls else 0)
        self.pixel_shape = layout.pixel_shape
        self.image_size = layout.pixel_shape[1]
        self.patch_size = config.patch_size
        self.native = None

    @property
    def parts(self) -> list["VisionEncoder"]:
        return [self]

    def read_native(self, native) -> None:
        """Read images at their own aspect ratio (:mod:`mmtrain.model.native_aspect`): inputs are padded patch rows."""
        self.native = native
        self.pixel_shape = (native.max_patches, self.patch_size * self.patch_size * self.layout.pixel_shape[0])

    def _inputs(self, pixel_values: torch.Tensor, grids=None) -> dict:
        if self.native is not None:  # a blank image (a rank without images) is one patch
            return native_inputs(pixel_values, grids if grids is not None else [(1, 1)] * pixel_values.shape[0])
        if not self.layout.patchified:
            return {"pixel_values": pixel_values}
        # SigLIP2 takes patch rows in its image processor's order: (row, column), then
        # (pixel row, pixel column, channel) inside each patch.
        n, c = pixel_values.shape[:2]
        (gh, gw), p = self.layout.grid, self.patch_size
        rows = pixel_values.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, p * p * c)
        grid = torch.tensor([gh, gw], device=pixel_values.device).expand(n, 2)
        mask = torch.ones(n, gh * gw, dtype=torch.long, device=pixel_values.device)
        return {"pixel_values": rows, "pixel_attention_mask": mask, "spatial_shapes": grid}

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
        out = self.tower(**self._inputs(pixel_values, grids), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        patches = features[:, self.prefix_tokens :]
        if self.keep_cls:
            return features if self.prefix_tokens == 1 else torch.cat([features[:, :1], patches], dim=1)
        return patches


class FusedVisionEncoder(nn.Module):
    """Two towers on one patch grid: per-patch features concatenated on the channel axis.

    ``pixel_values`` hold both towers' images stacked on the channel axis (what
    :class:`FusedImageProcessor` makes): the first tower's channels first, each padded
    at the bottom and right to the larger size.
    """

    def __init__(self, first: VisionEncoder, second: VisionEncoder):
        super().__init__()
        self.first = first
        self.second = second
        self.hidden_size = first.hidden_size + second.hidden_size
        self.num_patches = first.num_patches
        self.pixel_shape = stacked_pixel_shape(first.pixel_shape, second.pixel_shape)
        self.image_size = self.pixel_shape[1]
        self.has_cls = self.drop_cls = False

    @property
    def parts(self) -> list[VisionEncoder]:
        return [self.first, self.second]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features, start = [], 0
        for part in self.parts:
            c, h, w = part.pixel_shape
            features.append(part(pixel_values[:, start : start + c, :h, :w]))
            start += c
        return torch.cat(features, dim=-1)


def stacked_pixel_shape(*shapes: tuple[int, int, int]) -> tuple[int, int, int]:
    return (sum(s[0] for s in shapes), max(s[1] for s in shapes), max(s[2] for s in shapes))


class FusedImageProcessor:
    """Each image through each tower's own processor, the results stacked on the channel axis."""

    def __init__(self, processors: list, shapes: list[tuple[int, int, int]]):
        self.processors = processors
        self.shapes = shapes
        self.shape = stacked_pixel_shape(*shapes)

    def __call__(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        parts = [p(images=images, return_tensors="pt")["pixel_values"] for p in self.processors]
        stacked = parts[0].new_zeros(parts[0].shape[0], *self.shape)
        start = 0
        for part in parts:
            c, h, w = part.shape[1:]
            stacked[:, start : start + c, :h, :w] = part
            start += c
        return BatchFeature({"pixel_values": stacked}, tensor_type=return_tensors)


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer layers: the outermost ModuleList of ``num_hidden_layers`` modules."""
    count = tower.config.num_hidden_layers
    found = [(name.count("."), name, m) for name, m in tower.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not found:
        raise ConfigError(f"cannot find the {count} encoder layers of {type(tower).__name__}")
    return min(found, key=lambda f: f[:2])[2]


def _build_tower(spec: TowerSpec, model_args, *, dtype, strict: bool, weights: bool, preset_device) -> VisionEncoder:
    """Load one tower from its folder (or build a preset with seeded random weights).

    A preset goes through ``AutoModel.from_config`` as the LM does, not the bare class:
    that is the path on which transformers builds under ``deepspeed.zero.Init`` at
    ZeRO-3, which partitions the weights and puts the buffers (CLIP's ``position_ids``)
    on the GPU. A tower built outside it and handed to the ZeRO-3 engine (vision LoRA)
    kept its buffers on the CPU.
    """
    model_cls = MODEL_MAPPING[type(spec.config)]
    if presets.is_preset(spec.name) or not weights:  # weights=False: shapes only (the meta device)
        with presets.seeded_init(model_args.preset_seed, preset_device if weights else None):
            tower = AutoModel.from_config(spec.config, dtype=dtype, attn_implementation=model_args.attn_implementation)
    else:
        tower = checked_from_pretrained(
            model_cls,
            spec.name,
            field=spec.field,
            strict_unexpected=strict,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
        )
    return VisionEncoder(tower, model_args.vision_feature_layer, model_args.vision_keep_cls, spec.layout)


def build_vision_encoder(
    model_args,
    *,
    dtype: torch.dtype,
    specs: list[TowerSpec] | None = None,
    strict: bool = False,
    weights: bool = True,
    preset_device: torch.device | None = None,
) -> VisionEncoder | FusedVisionEncoder:
    """The encoder ``model_args`` names: one tower, or two fused (``vision_model_name_or_path_2``)."""
    specs = specs or tower_specs(model_args)
    parts = [_build_tower(s, model_args, dtype=dtype, strict=strict, weights=weights, preset_device=preset_device) for s in specs]
    return parts[0] if len(parts) == 1 else FusedVisionEncoder(*parts)


def load_image_processor(model_args, specs: list[TowerSpec] | None = None):
    """What turns an image into the encoder's ``pixel_values`` (both towers' processors when fused)."""
    specs = specs or tower_specs(model_args)
    if len(specs) == 1:
        return specs[0].image_processor
    return FusedImageProcessor([s.image_processor for s in specs], [s.layout.pixel_shape for s in specs])
