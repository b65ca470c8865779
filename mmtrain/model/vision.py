"""The vision encoder: any Hugging Face CLIP or SigLIP vision tower, read at one hidden layer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from mmtrain import presets
from mmtrain.model.errors import ConfigError
from mmtrain.model.hf_loading import checked_from_pretrained

# Supported towers, detected by config class (never by the folder's name). A full
# CLIP/SigLIP checkpoint (text + vision) works too: its vision half is taken.
_TOWERS: dict[type, tuple[type, bool]] = {
    # config class -> (vision model class, has a CLS token)
    CLIPVisionConfig: (CLIPVisionModel, True),
    CLIPConfig: (CLIPVisionModel, True),
    SiglipVisionConfig: (SiglipVisionModel, False),
    SiglipConfig: (SiglipVisionModel, False),
}


def load_vision_config(name_or_path: str, flag: str = "--vision_model_name_or_path") -> PretrainedConfig:
    """The vision tower's config, from a preset or a folder; unsupported kinds fail here."""
    if presets.is_preset(name_or_path):
        config = presets.preset_config(name_or_path)
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{flag} {name_or_path!r}: cannot read a Hugging Face config: {e}") from None
    if type(config) not in _TOWERS:
        valid = ", ".join(c.__name__ for c in _TOWERS)
        raise ConfigError(f"{flag} {name_or_path!r} holds a {type(config).__name__}; supported vision configs: {valid}")
    if isinstance(config, (CLIPConfig, SiglipConfig)):
        config = config.vision_config
    return config


class VisionEncoder(nn.Module):
    """A vision tower that returns the patch features of one hidden layer.

    ``feature_layer`` indexes ``hidden_states`` (LLaVA reads -2, the second to last);
    CLIP's CLS token is dropped unless ``keep_cls``.
    """

    def __init__(self, tower: nn.Module, feature_layer: int, keep_cls: bool, has_cls: bool):
        super().__init__()
        self.tower = tower
        self.feature_layer = feature_layer
        self.has_cls = has_cls
        self.drop_cls = has_cls and not keep_cls
        config = tower.config
        layers = config.num_hidden_layers
        if not -(layers + 1) <= feature_layer <= layers:
            raise ConfigError(f"--vision_feature_layer {feature_layer} is outside [-{layers + 1}, {layers}] for this {layers}-layer encoder")
        # Layers after the one we read are dead weight: dropping them saves their compute
        # and memory, and leaves no LoRA adapter without a gradient. hidden_states[i] is
        # the output of layer i (0: the embeddings), so keeping layers[:i] and reading the
        # last hidden state gives the same features.
        keep = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer
        layer_list = _encoder_layers(tower)
        # (reading the embeddings, layer 0, keeps one layer: a tower with none returns no hidden states)
        if max(keep, 1) < len(layer_list):
            del layer_list[max(keep, 1) :]
            config.num_hidden_layers = max(keep, 1)
        self.feature_layer = -1 if keep > 0 else 0
        self.hidden_size = config.hidden_size
        self.num_patches = (config.image_size // config.patch_size) ** 2 + (1 if has_cls and keep_cls else 0)
        self.image_size = config.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        return features[:, 1:] if self.drop_cls else features


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer layers (``encoder.layers`` in CLIP and SigLIP)."""
    for name, module in tower.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(f"cannot find the encoder layers of {type(tower).__name__}")


def build_vision_encoder(
    model_args,
    *,
    dtype: torch.dtype,
    config: PretrainedConfig | None = None,
    strict: bool = False,
    weights: bool = True,
    preset_device: torch.device | None = None,
) -> VisionEncoder:
    """Load the vision tower from its folder (or build a preset with seeded random weights).

    A preset goes through ``AutoModel.from_config`` as the LM does, not the bare class:
    that is the path on which transformers builds under ``deepspeed.zero.Init`` at
    ZeRO-3, which partitions the weights and puts the buffers (CLIP's ``position_ids``)
    on the GPU. A tower built outside it and handed to the ZeRO-3 engine (vision LoRA)
    kept its buffers on the CPU.
    """
    name = model_args.vision_model_name_or_path
    config = config or load_vision_config(name)
    model_cls, has_cls = _TOWERS[type(config)]
    if presets.is_preset(name) or not weights:  # weights=False: shapes only (the meta device)
        with presets.seeded_init(model_args.preset_seed, preset_device if weights else None):
            tower = AutoModel.from_config(config, dtype=dtype, attn_implementation=model_args.attn_implementation)
        if not isinstance(tower, model_cls):
            raise ConfigError(f"{name!r}: transformers built a {type(tower).__name__}, expected {model_cls.__name__}")
    else:
        tower = checked_from_pretrained(
            model_cls,
            name,
            flag="--vision_model_name_or_path",
            strict_unexpected=strict,
            dtype=dtype,
            attn_implementation=model_args.attn_implementation,
        )
    return VisionEncoder(tower, model_args.vision_feature_layer, model_args.vision_keep_cls, has_cls)


def load_image_processor(model_args, config: PretrainedConfig | None = None):
    name = model_args.vision_model_name_or_path
    if presets.is_preset(name):
        return presets.build_preset_image_processor(config or load_vision_config(name))
    try:
        return AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--vision_model_name_or_path {name!r} has no image processor (preprocessor_config.json): {e}") from None
