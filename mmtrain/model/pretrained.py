"""Exports in Hugging Face format, and loading them back strictly.

An export folder holds standard pieces, each loadable on its own::

    mmtrain_config.json        what the pieces are and how they connect
    language_model/            AutoModelForCausalLM folder (LoRA fused, new token rows
                               written into the embedding table) + tokenizer
    vision_encoder/            CLIP/SigLIP vision folder (LoRA fused, cut at the layer
                               read) + image processor
    projector.safetensors      the projector's weights

LoRA is fused into a *copy* of the weights (``merge_lora_state_dict``), so the model in
training is never modified. Loading is strict: a missing or unexpected tensor in any
piece is an error, never a silently random weight.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.model.builder import BuiltModel, build_model
from mmtrain.model.lora import lora_scalings, merge_lora_state_dict
from mmtrain.model.vlm import VisionLanguageModel

EXPORT_CONFIG = "mmtrain_config.json"
EXPORT_FORMAT = 1


def full_state_dict(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """The whole model's tensors with the frozen vision encoder's included (single process)."""
    state = dict(model.state_dict())
    if not model.vision_trainable:
        state.update({f"vision_encoder.{k}": v for k, v in model.vision.state_dict().items()})
    return state


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _language_model_tensors(state: dict, model: VisionLanguageModel, vocab_size: int) -> tuple[dict, int]:
    """LM tensors in the LM's own names, with the new rows folded into the table."""
    lm = _split(state, "language_model.")
    emb_key = next(k for k in lm if k.endswith("embed_tokens.base.weight"))
    base = lm.pop(emb_key)
    new_rows = lm.pop(emb_key.replace("base.weight", "new_rows"))
    first_new = model.image_tokens.original_vocab_size
    rows = max(base.shape[0], vocab_size)
    table = torch.zeros(rows, base.shape[1], dtype=base.dtype)
    table[: base.shape[0]] = base
    table[first_new : first_new + new_rows.shape[0]] = new_rows.to(base.dtype)
    lm[emb_key.replace(".base.weight", ".weight")] = table
    head_key = next((k for k in lm if k.endswith("lm_head.weight")), None)
    if head_key is not None and lm[head_key].shape[0] < rows:
        # New tokens are never prediction targets: their output rows are zero.
        head = lm[head_key]
        grown = torch.zeros(rows, head.shape[1], dtype=head.dtype)
        grown[: head.shape[0]] = head
        lm[head_key] = grown
    return lm, rows


def save_pretrained(
    folder: str,
    state: dict[str, torch.Tensor],
    model: VisionLanguageModel,
    tokenizer,
    image_processor,
    model_args: ModelArguments,
    *,
    template: str = "plain",
    system_prompt: str = "",
) -> None:
    """Write an export from a full (gathered) state dict of ``model``; main process only.

    ``template`` and ``system_prompt`` are recorded so generation renders prompts the
    way training did.
    """
    os.makedirs(folder, exist_ok=True)
    state = merge_lora_state_dict({k: v.detach().cpu() for k, v in state.items()}, lora_scalings(model))
    lm_tensors, vocab_rows = _language_model_tensors(state, model, len(tokenizer))
    lm_dir = os.path.join(folder, "language_model")
    lm_config = copy.deepcopy(model.language_model.config)
    lm_config.vocab_size = vocab_rows
    lm_config.save_pretrained(lm_dir)
    if getattr(model.language_model, "generation_config", None) is not None:
        model.language_model.generation_config.save_pretrained(lm_dir)
    save_torch_state_dict({k: v.contiguous() for k, v in lm_tensors.items()}, lm_dir)
    tokenizer.save_pretrained(lm_dir)

    vision_dir = os.path.join(folder, "vision_encoder")
    vision = model.vision
    vision.tower.config.save_pretrained(vision_dir)
    save_torch_state_dict({k: v.contiguous() for k, v in _split(state, "vision_encoder.tower.").items()}, vision_dir)
    image_processor.save_pretrained(vision_dir)

    save_file({k: v.contiguous() for k, v in _split(state, "projector.").items()}, os.path.join(folder, "projector.safetensors"))
    config = {
        "format_version": EXPORT_FORMAT,
        "vis_proj": model_args.vis_proj,
        "perceiver_num_queries": model_args.perceiver_num_queries,
        "vision_keep_cls": model_args.vision_keep_cls,
        # The attention the LM was trained with changes what it computes, not its weights:
        # an export that forgot it would load and answer with plain causal attention.
        "enable_mmca_attention": model_args.enable_mmca_attention,
        "mmca_image_attention": model_args.mmca_image_attention,
        "image_tokens_per_image": model.image_tokens.per_image,
        "original_vocab_size": model.image_tokens.original_vocab_size,
        "template": template,
        "system_prompt": system_prompt,
        "trained_from": {"lm": model_args.lm_model_name_or_path, "vision": model_args.vision_model_name_or_path},
    }
    with open(os.path.join(folder, EXPORT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def load_pretrained(folder: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BuiltModel:
    """Load an export for inference; any missing or unexpected tensor is an error."""
    config_path = os.path.join(folder, EXPORT_CONFIG)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{folder!r} is not an mmtrain export: {EXPORT_CONFIG} is missing")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("format_version") != EXPORT_FORMAT:
        raise ConfigError(f"{config_path}: export format {config.get('format_version')} is not {EXPORT_FORMAT}")
    args = ModelArguments(
        lm_model_name_or_path=os.path.join(folder, "language_model"),
        vision_model_name_or_path=os.path.join(folder, "vision_encoder"),
        vis_proj=config["vis_proj"],
        perceiver_num_queries=config["perceiver_num_queries"],
        vision_keep_cls=config["vision_keep_cls"],
        # Exports written before the attention was recorded carry no key: they were
        # exported (and so reload) with plain causal attention.
        enable_mmca_attention=bool(config.get("enable_mmca_attention", False)),
        mmca_image_attention=config.get("mmca_image_attention", "same_image"),
        vision_feature_layer=-1,  # the export's encoder already ends at the layer we read
        lang_lora_dim=0,  # LoRA is fused into the exported weights
        vis_lora_dim=0,
    )
    built = build_model(args, dtype=dtype, strict=True)
    projector_path = os.path.join(folder, "projector.safetensors")
    try:
        built.model.projector.load_state_dict(load_file(projector_path), strict=True)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{projector_path}: {e}") from None
    if built.image_tokens.per_image != config["image_tokens_per_image"]:
        raise ConfigError(f"{config_path}: {config['image_tokens_per_image']} image tokens recorded, model gives {built.image_tokens.per_image}")
    built.model.to(device)
    built.model.place_frozen_vision(torch.device(device), dtype)
    built.model.eval()
    return built


def prompt_format(folder: str) -> tuple[str, str]:
    """(template, system prompt) an export was trained with."""
    with open(os.path.join(folder, EXPORT_CONFIG)) as f:
        config = json.load(f)
    return config.get("template", "plain"), config.get("system_prompt", "")
