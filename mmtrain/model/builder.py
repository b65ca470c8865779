"""Compose the VLM from its config, decide what trains, apply the speed options, and count it."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from mmtrain.image_tokens import ImageTokens
from mmtrain.model.anyres import AnyResImageProcessor, add_newline, anyres_layout
from mmtrain.model.native_aspect import NativeAspectProcessor, native_layout
from mmtrain.model.attention import use_packed_attention
from mmtrain.model.config import LORA_SCOPE_AUTO, SpeedOptions, VLMConfig
from mmtrain.model.counting import ComponentCount, count_parameters, numel  # noqa: F401  (re-exported)
from mmtrain.model.decoder_layers import (
    checkpoint_first_layers,
    compile_decoder_layers,
    decoder_layer_scope,
    decoder_layers,
    enable_checkpointing,
)
from mmtrain.model.errors import ConfigError
from mmtrain.model.fp8 import convert_frozen_linears
from mmtrain.model.fused_lora import fuse_lora_layers
from mmtrain.model.nf4 import quantize_frozen_linears
from mmtrain.model.llava_import import read_folder
from mmtrain.model.language import NewTokenEmbedding, build_language_model, language_attention, load_language_config, load_tokenizer
from mmtrain.model.lora import apply_lora, is_lora_parameter, lora_inputs_follow_autocast
from mmtrain.model.mmca import enable_mmca, uses_mmca
from mmtrain.model.projector import build_projector
from mmtrain.model.tokens import add_image_tokens
from mmtrain.model.video import check_video_grid, frame_positions
from mmtrain.model.vision import build_vision_encoder, load_image_processor, tower_specs
from mmtrain.model.vlm import VisionLanguageModel

logger = logging.getLogger("mmtrain")


@dataclass
class BuiltModel:
    model: VisionLanguageModel
    tokenizer: object
    image_processor: object
    image_tokens: ImageTokens
    config: VLMConfig
    lora_targets: dict[str, list[str]] = field(default_factory=dict)


def check_model_config(config: VLMConfig) -> None:
    """Everything about the model settings that can fail, checked from configs alone (no weights)."""
    if config.vlm_name_or_path:
        if config.vision_model_name_or_path_2:
            raise ConfigError(
                "vision_model_name_or_path_2 cannot be used with vlm_name_or_path: a LLaVA folder holds one vision tower",
                fields=("vision_model_name_or_path_2", "vlm_name_or_path"),
            )
        anyres_layout(config, [read_folder(config.vlm_name_or_path).tower_spec()])  # the grids against its tower's size
    else:
        specs = tower_specs(config)  # each tower's config and image processor, and that fused grids agree
        anyres_layout(config, specs)  # tile sizes
        native_layout(config, specs)
        check_video_grid(config, specs)
    lm_config = language_config(config)
    layers = getattr(lm_config, "num_hidden_layers", None)
    if config.lm_mode == "last_layers" and layers is not None and config.lm_trainable_layers > layers:
        raise ConfigError(f"lm_trainable_layers {config.lm_trainable_layers}: the LM has only {layers} decoder layers", fields=("lm_trainable_layers",))
    if config.enable_mmca_attention and (why := language_attention(lm_config, "sdpa")[1]):
        raise ConfigError(f"enable_mmca_attention: MMCA computes its attention through SDPA, and {why}", fields=("enable_mmca_attention",))
    if getattr(lm_config, "tie_word_embeddings", False) and config.train_lm_head != config.train_full_embeddings:
        raise ConfigError(
            f"lm_model_name_or_path {config.lm_model_name_or_path!r} ties its output head to the input embeddings, so "
            f"train_lm_head ({config.train_lm_head}) and train_full_embeddings ({config.train_full_embeddings}) must agree",
            fields=("lm_model_name_or_path", "train_lm_head", "train_full_embeddings"),
        )


def language_config(config: VLMConfig):
    """The LM's Hugging Face config (from its folder, or a LLaVA folder's text config); no weights read."""
    if config.vlm_name_or_path:
        return read_folder(config.vlm_name_or_path).text_config
    return load_language_config(config.lm_model_name_or_path)


def build_model(
    config: VLMConfig,
    *,
    speed: SpeedOptions | None = None,
    dtype: torch.dtype = torch.float32,
    trainable_dtype: torch.dtype | None = None,
    meta: bool = False,
    frozen_vision_context: contextlib.AbstractContextManager | None = None,
    strict: bool = False,
    preset_device: torch.device | None = None,
) -> BuiltModel:
    """Build the model ``config`` describes (and only it: nothing else is read).

    ``speed`` switches on the run-time options (fused LoRA, regional compilation,
    activation checkpointing); each keeps the plain path's numbers.

    ``meta=True`` builds every module on the meta device: exact shapes and counts, no
    memory, no weights read (what ``mmtrain.budget`` uses). ``frozen_vision_context``
    wraps the loading of a frozen vision encoder; at ZeRO-3 the trainer passes one that
    turns ``zero.Init`` off, so that encoder stays whole and outside the engine.
    ``strict`` also rejects unexpected tensors in the folders (for reloading exports).
    ``preset_device`` is where presets draw their random weights (the trainer passes
    its GPU at ZeRO 0-2; at ZeRO-3 ``zero.Init`` places them).
    """
    llava = read_folder(config.vlm_name_or_path) if config.vlm_name_or_path else None
    if llava is not None:
        vision_specs, lm_config = None, llava.text_config
    else:
        vision_specs = tower_specs(config)
        lm_config = load_language_config(config.lm_model_name_or_path)
    config = config.model_config()  # a subclass (the command line's) may carry more than the model
    vision_trainable = config.vision_trainable
    trainable_dtype = trainable_dtype or dtype
    device_ctx = torch.device("meta") if meta else contextlib.nullcontext()
    vision_ctx = frozen_vision_context if (frozen_vision_context and not vision_trainable) else contextlib.nullcontext()

    tokenizer = llava.tokenizer() if llava else load_tokenizer(config.lm_model_name_or_path)
    image_processor = llava.image_processor() if llava else load_image_processor(config, vision_specs)
    anyres = anyres_layout(config, [llava.tower_spec()] if llava is not None else vision_specs)
    if anyres is not None:
        image_processor = AnyResImageProcessor(image_processor, anyres)  # tiles, each as the tower's processor would
    native = native_layout(config, vision_specs) if llava is None else None
    if native is not None:
        image_processor = NativeAspectProcessor(vision_specs[0].name, native)  # the tower's own NaFlex processor
    with device_ctx:
        with vision_ctx:
            if llava is not None:
                vision = llava.vision_encoder(config, dtype=dtype, weights=not meta)
            else:
                vision = build_vision_encoder(
                    config, dtype=dtype, specs=vision_specs, strict=strict, weights=not meta, preset_device=preset_device
                )
        if llava is not None:
            language_model = llava.language_model(config, dtype=dtype, weights=not meta)
        else:
            language_model = build_language_model(
                config, dtype=dtype, config=lm_config, strict=strict, weights=not meta, preset_device=preset_device
            )
        if config.enable_mmca_attention:
            enable_mmca(language_model, config.mmca_image_attention)
        lm_dim = language_model.get_input_embeddings().embedding_dim
        projector = build_projector(
            config.vis_proj, vision.hidden_size, lm_dim, vision.num_patches, config.perceiver_num_queries
        ).to(trainable_dtype)
        if anyres is not None:
            add_newline(projector, lm_dim, trainable_dtype)
        if llava is not None and not meta:
            llava.load_projector(projector)  # a LLaVA-NeXT folder's newline too
        image_tokens = add_image_tokens(
            tokenizer, per_image=projector.num_tokens, markup=config.image_markup, anyres=anyres, native=native,
            per_frame=frame_positions(config.video_pool, vision, projector),
        )
        if native is not None:
            vision.read_native(native)
        _install_new_token_rows(language_model, image_tokens, len(tokenizer), lm_config)

        lora_targets: dict[str, list[str]] = {}
        if config.lang_lora_dim:
            lora_targets["language_model"] = apply_lora(
                language_model,
                rank=config.lang_lora_dim,
                scope=lora_scope(language_model, config.lang_lora_module_name),
                alpha=config.lang_lora_alpha,
                dropout=config.lang_lora_dropout,
                field="lang_lora_module_name",
            )
        if config.vis_lora_dim:
            lora_targets["vision_encoder"] = apply_lora(
                vision,
                rank=config.vis_lora_dim,
                scope=config.vis_lora_module_name,
                alpha=config.vis_lora_alpha,
                dropout=config.vis_lora_dropout,
                field="vis_lora_module_name",
            )
        model = VisionLanguageModel(
            vision, projector, language_model, image_tokens, vision_trainable=vision_trainable, video_pool=config.video_pool
        )
    set_trainable(model, config, trainable_dtype)
    if speed is not None:
        apply_speed_options(model, speed)
    return BuiltModel(model, tokenizer, image_processor, image_tokens, config, lora_targets)


def apply_speed_options(model: VisionLanguageModel, speed: SpeedOptions) -> None:
    """Switch on the run-time options, each logged; the model computes the same function."""
    lm = model.language_model
    # First: fused LoRA and compilation must see the float8 layers.
    for part, wanted in (("base", speed.fp8_base), ("vision", speed.fp8_vision)):
        if wanted:
            root, scopes = float8_scopes(model)[part]
            conversion = convert_frozen_linears(root, scopes, keep_original=speed.fp8_keep_originals, device=speed.fp8_device)
            logger.info(conversion.describe(f"{part} (--fp8_{part})"))
    for part, flag, wanted in (("base", "--quantize_base", speed.nf4_base), ("vision", "--quantize_vision", speed.nf4_vision)):
        if wanted:
            root, scopes = float8_scopes(model)[part]
            logger.info(quantize_frozen_linears(root, scopes, device=speed.nf4_device).describe(f"{part} ({flag} nf4)"))
    if speed.lora_inputs_follow_autocast:
        lora_inputs_follow_autocast(model)
    if speed.fused_lora and (count := fuse_lora_layers(model)):
        logger.info(f"fused LoRA: {count} adapted layers add their low-rank term inside the base matrix product")
        if speed.nf4_base or speed.nf4_vision:
            # The fused product takes a plain or float8 weight; 4-bit codes are dequantised by
            # bitsandbytes inside its own product, so those layers keep peft's forward (same numbers).
            logger.info("fused LoRA: layers over an NF4 base keep peft's forward (bitsandbytes' 4-bit product is not fused)")
    if speed.gradient_checkpointing:
        enable_checkpointing(lm)
        if model.vision_trainable:
            for part in model.vision.parts:
                enable_checkpointing(part.tower)
    if speed.gradient_checkpointing_layers:
        layers = checkpoint_first_layers(lm, speed.gradient_checkpointing_layers)
        logger.info(f"activation checkpointing on LM decoder layers {layers[0]}..{layers[-1]} only")
    if speed.packed_attention and not uses_mmca(lm):
        use_packed_attention(lm, speed.packed_attention)
    if speed.compile_decoder_layers:
        count = compile_decoder_layers(lm, hooks_outside=speed.compile_hooks_outside)
        logger.info(f"torch.compile: {count} LM decoder layers compiled (regional compilation)")




def lora_scope(language_model: nn.Module, scope: str) -> str:
    """``--lang_lora_module_name`` as a scope of module names: ``auto`` is the LM's decoder layers, found from the model."""
    if scope != LORA_SCOPE_AUTO:
        return scope
    found = decoder_layer_scope(language_model)
    logger.info(f"LoRA scope: {found!r}, the LM's decoder layers (--lang_lora_module_name {LORA_SCOPE_AUTO})")
    return found


def float8_scopes(model: VisionLanguageModel) -> dict[str, tuple[nn.Module, list[nn.Module]]]:
    """Where ``--fp8_base`` and ``--fp8_vision`` (and ``--quantize_base``/``--quantize_vision``) convert frozen Linears: ``{part: (root, scopes)}``.

    The LM's decoder layers only (its embeddings and ``lm_head`` are outside them), and
    the whole vision tower (both, when fused).
    """
    lm, vision = model.language_model, model.vision
    towers = [part.tower for part in vision.parts]
    return {"base": (lm, list(decoder_layers(lm))), "vision": (towers[0] if len(towers) == 1 else vision, towers)}


def _install_new_token_rows(language_model: nn.Module, image_tokens: ImageTokens, vocab_size: int, config) -> None:
    base = language_model.get_input_embeddings()
    if isinstance(base, NewTokenEmbedding):
        return
    first_new = image_tokens.original_vocab_size
    embedding = NewTokenEmbedding(base, first_new, image_tokens.num_new_rows(vocab_size), init_std=getattr(config, "initializer_range", 0.02))
    language_model.set_input_embeddings(embedding)


def set_trainable(model: VisionLanguageModel, config: VLMConfig, trainable_dtype: torch.dtype) -> None:
    """The one place that decides what trains.

    Projector: always. LoRA adapters: when present. New-token embedding rows: unless
    ``--only_optimize_lora``. The whole input-embedding table: with
    ``--train_full_embeddings``; the output head: with ``--train_lm_head``. The LM's
    other weights follow ``--lm_training``: all of them with ``full``; the last
    ``--lm_trainable_layers`` decoder layers and the final norm with ``last_layers``;
    none otherwise. Everything else is frozen.
    """
    lm_trained = _lm_weights_trained(model.language_model, config)
    head = model.language_model.get_output_embeddings()
    for name, param in model.named_parameters():
        if name.startswith("projector."):
            train = True
        elif is_lora_parameter(name):
            train = True
        elif name.endswith("embed_tokens.new_rows") or name.endswith(".new_rows"):
            train = not config.only_optimize_lora
        elif name.endswith("embed_tokens.base.weight") or _is_input_embedding(model, param):
            train = config.train_full_embeddings
        elif head is not None and param is head.weight:
            train = config.train_lm_head
        else:
            train = id(param) in lm_trained
        param.requires_grad_(train)
        if train and param.dtype != trainable_dtype and param.device.type != "meta":
            param.data = param.data.to(trainable_dtype)


def _lm_weights_trained(language_model: nn.Module, config: VLMConfig) -> set[int]:
    """Ids of the LM's own weights ``--lm_training`` trains (embeddings and head are decided apart)."""
    mode = config.lm_mode
    if mode == "full":
        return {id(p) for p in language_model.parameters()}
    if mode != "last_layers":
        return set()
    layers = decoder_layers(language_model)
    trained = [*layers[len(layers) - config.lm_trainable_layers :]]
    norm = getattr(language_model.get_decoder(), "norm", None)
    if isinstance(norm, nn.Module):
        trained.append(norm)  # the final norm reads the last layer's output only
    return {id(p) for module in trained for p in module.parameters()}


def _is_input_embedding(model: VisionLanguageModel, param: nn.Parameter) -> bool:
    emb = model.language_model.get_input_embeddings()
    base = emb.base if isinstance(emb, NewTokenEmbedding) else emb
    return param is base.weight
