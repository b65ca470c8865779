"""Compose the VLM from the user's pieces, decide what trains, and count it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from mmtrain import compat
from mmtrain.args import ModelArguments
from mmtrain.model.language import NewTokenEmbedding, build_language_model, load_language_config, load_tokenizer
from mmtrain.model.lora import apply_lora, is_lora_parameter
from mmtrain.model.mmca import enable_mmca
from mmtrain.model.projector import build_projector
from mmtrain.model.tokens import ImageTokens, add_image_tokens
from mmtrain.model.vision import build_vision_encoder, load_image_processor, load_vision_config
from mmtrain.model.vlm import VisionLanguageModel


@dataclass
class BuiltModel:
    model: VisionLanguageModel
    tokenizer: object
    image_processor: object
    image_tokens: ImageTokens
    lora_targets: dict[str, list[str]] = field(default_factory=dict)


def check_model_args(model_args: ModelArguments) -> None:
    """Everything about the model flags that can fail, checked from configs alone (no weights)."""
    load_vision_config(model_args.vision_model_name_or_path)
    load_language_config(model_args.lm_model_name_or_path)


def build_model(
    model_args: ModelArguments,
    *,
    dtype: torch.dtype = torch.float32,
    trainable_dtype: torch.dtype | None = None,
    meta: bool = False,
    frozen_vision_context: contextlib.AbstractContextManager | None = None,
    strict: bool = False,
    preset_device: torch.device | None = None,
) -> BuiltModel:
    """Build the model described by ``model_args``.

    ``meta=True`` builds every module on the meta device: exact shapes and counts, no
    memory, no weights read (what ``mmtrain.budget`` uses). ``frozen_vision_context``
    wraps the loading of a frozen vision encoder; at ZeRO-3 the trainer passes one that
    turns ``zero.Init`` off, so that encoder stays whole and outside the engine.
    ``strict`` also rejects unexpected tensors in the folders (for reloading exports).
    ``preset_device`` is where presets draw their random weights (the trainer passes
    its GPU at ZeRO 0-2; at ZeRO-3 ``zero.Init`` places them).
    """
    vision_config = load_vision_config(model_args.vision_model_name_or_path)
    lm_config = load_language_config(model_args.lm_model_name_or_path)
    vision_trainable = model_args.vis_lora_dim > 0
    trainable_dtype = trainable_dtype or dtype
    device_ctx = torch.device("meta") if meta else contextlib.nullcontext()
    vision_ctx = frozen_vision_context if (frozen_vision_context and not vision_trainable) else contextlib.nullcontext()

    tokenizer = load_tokenizer(model_args.lm_model_name_or_path)
    image_processor = load_image_processor(model_args, vision_config)
    with device_ctx:
        with vision_ctx:
            vision = build_vision_encoder(
                model_args, dtype=dtype, config=vision_config, strict=strict, weights=not meta, preset_device=preset_device
            )
        language_model = build_language_model(
            model_args, dtype=dtype, config=lm_config, strict=strict, weights=not meta, preset_device=preset_device
        )
        if model_args.enable_mmca_attention:
            enable_mmca(language_model, model_args.mmca_image_attention)
        lm_dim = language_model.get_input_embeddings().embedding_dim
        projector = build_projector(
            model_args.vis_proj, vision.hidden_size, lm_dim, vision.num_patches, model_args.perceiver_num_queries
        ).to(trainable_dtype)
        image_tokens = add_image_tokens(tokenizer, per_image=projector.num_tokens)
        _install_new_token_rows(language_model, image_tokens, len(tokenizer), lm_config)

        lora_targets: dict[str, list[str]] = {}
        if model_args.lang_lora_dim:
            lora_targets["language_model"] = apply_lora(
                language_model,
                rank=model_args.lang_lora_dim,
                scope=model_args.lang_lora_module_name,
                alpha=model_args.lang_lora_alpha,
                dropout=model_args.lang_lora_dropout,
                flag="--lang_lora_module_name",
            )
        if model_args.vis_lora_dim:
            lora_targets["vision_encoder"] = apply_lora(
                vision,
                rank=model_args.vis_lora_dim,
                scope=model_args.vis_lora_module_name,
                alpha=model_args.vis_lora_alpha,
                dropout=model_args.vis_lora_dropout,
                flag="--vis_lora_module_name",
            )
        model = VisionLanguageModel(vision, projector, language_model, image_tokens, vision_trainable=vision_trainable)
    set_trainable(model, model_args, trainable_dtype)
    return BuiltModel(model, tokenizer, image_processor, image_tokens, lora_targets)


def _install_new_token_rows(language_model: nn.Module, image_tokens: ImageTokens, vocab_size: int, config) -> None:
    base = language_model.get_input_embeddings()
    if isinstance(base, NewTokenEmbedding):
        return
    first_new = image_tokens.original_vocab_size
    embedding = NewTokenEmbedding(base, first_new, vocab_size - first_new, init_std=getattr(config, "initializer_range", 0.02))
    language_model.set_input_embeddings(embedding)


def set_trainable(model: VisionLanguageModel, model_args: ModelArguments, trainable_dtype: torch.dtype) -> None:
    """The one place that decides what trains.

    Projector: always. LoRA adapters: when present. New-token embedding rows: unless
    ``--only_optimize_lora``. The whole input-embedding table: with
    ``--train_full_embeddings``. Everything else is frozen.
    """
    for name, param in named_parameters_all(model):
        if name.startswith("projector."):
            train = True
        elif is_lora_parameter(name):
            train = True
        elif name.endswith("embed_tokens.new_rows") or name.endswith(".new_rows"):
            train = not model_args.only_optimize_lora
        elif name.endswith("embed_tokens.base.weight") or _is_input_embedding(model, param):
            train = model_args.train_full_embeddings
        else:
            train = False
        param.requires_grad_(train)
        if train and param.dtype != trainable_dtype and param.device.type != "meta":
            param.data = param.data.to(trainable_dtype)


def _is_input_embedding(model: VisionLanguageModel, param: nn.Parameter) -> bool:
    emb = model.language_model.get_input_embeddings()
    base = emb.base if isinstance(emb, NewTokenEmbedding) else emb
    return param is base.weight


def named_parameters_all(model: VisionLanguageModel):
    """All parameters, the unregistered frozen vision encoder's included (prefixed as if registered)."""
    yield from model.named_parameters()
    if not model.vision_trainable:
        for name, param in model.vision.named_parameters():
            yield f"vision_encoder.{name}", param


COMPONENTS = (
    "vision encoder",
    "vision LoRA",
    "projector",
    "LM input embeddings",
    "new token embeddings",
    "language model",
    "LM LoRA",
)


def component_of(name: str) -> str:
    if name.startswith("vision_encoder."):
        return "vision LoRA" if is_lora_parameter(name) else "vision encoder"
    if name.startswith("projector."):
        return "projector"
    if is_lora_parameter(name):
        return "LM LoRA"
    if name.endswith(".new_rows"):
        return "new token embeddings"
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return "LM input embeddings"
    return "language model"


def numel(param: nn.Parameter) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter."""
    return compat.full_numel(param)


@dataclass
class ComponentCount:
    name: str
    total: int = 0
    trainable: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(model: VisionLanguageModel) -> list[ComponentCount]:
    """Parameters per component (see ``COMPONENTS``), total and trainable."""
    counts = {name: ComponentCount(name) for name in COMPONENTS}
    for name, param in named_parameters_all(model):
        c = counts[component_of(name)]
        n = numel(param)
        c.total += n
        if param.requires_grad:
            c.trainable += n
    return list(counts.values())
