"""Exports in Hugging Face format, and loading them back strictly.

An export folder holds standard pieces, each loadable on its own::

    mmtrain_config.json        the exported model's VLMConfig (what it is, MMCA included),
                               the config it was trained with, image tokens, prompt format
    language_model/            AutoModelForCausalLM folder (LoRA fused, new token rows
                               written into the embedding table) + tokenizer; its config
                               and generation config carry the tokenizer's bos/eos/pad ids
    vision_encoder/            the vision tower's folder (LoRA fused, cut at the layer
                               read) + its image processor
    vision_encoder_2/          the second tower's, when two are fused
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
from transformers import GenerationConfig

from mmtrain.model.builder import BuiltModel, build_model
from mmtrain.model.config import VLMConfig
from mmtrain.model.errors import ConfigError
from mmtrain.model.lora import lora_scalings, merge_lora_state_dict
from mmtrain.model.vlm import VisionLanguageModel

EXPORT_CONFIG = "mmtrain_config.json"
EXPORT_FORMAT = 2  # 1: before the model config was saved (still loads; see _legacy_config)
LANGUAGE_DIR = "language_model"
VISION_DIR = "vision_encoder"
VISION_DIR_2 = "vision_encoder_2"


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _language_model_tensors(state: dict, model: VisionLanguageModel, vocab_size: int) -> tuple[dict, int]:
    """LM tensors in the LM's own names, with the new rows folded into the table.

    A head tied to the table (Gemma, SmolLM3, ...) is not written: transformers ties it
    to the table again on loading, new rows included.
    """
    lm = _split(state, "language_model.")
    # the NewTokenEmbedding, under the LM's own name for its table (embed_tokens, embed_in, word_embeddings, ...)
    rows_key = next(k for k in lm if k.endswith(".new_rows"))
    emb_key = rows_key[: -len("new_rows")] + "base.weight"
    base = lm.pop(emb_key)
    new_rows = lm.pop(rows_key)
    first_new = model.image_tokens.original_vocab_size
    rows = max(base.shape[0], vocab_size)
    table = torch.zeros(rows, base.shape[1], dtype=base.dtype)
    table[: base.shape[0]] = base
    table[first_new : first_new + new_rows.shape[0]] = new_rows.to(base.dtype)
    lm[emb_key.replace(".base.weight", ".weight")] = table
    head = model.language_model.get_output_embeddings()
    head_key = next((f"{n}.weight" for n, m in model.language_model.named_modules() if head is not None and m is head), None)
    tied = head is not None and head.weight is model.language_model.get_input_embeddings().base.weight
    if head_key in lm and tied:
        del lm[head_key]
    elif head_key in lm and lm[head_key].shape[0] < rows:
        # New tokens are never prediction targets: their output rows are zero.
        head = lm[head_key]
        grown = torch.zeros(rows, head.shape[1], dtype=head.dtype)
        grown[: head.shape[0]] = head
        lm[head_key] = grown
    return lm, rows


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids as the tokenizer has them, under the names configs use."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_pretrained(
    folder: str,
    state: dict[str, torch.Tensor],
    model: VisionLanguageModel,
    tokenizer,
    image_processor,
    config: VLMConfig,
    *,
    template: str = "plain",
    system_prompt: str = "",
) -> None:
    """Write an export from a full (gathered) state dict of ``model``; main process only.

    ``config`` is the model's training config; the export records the exported model's
    own config (LoRA fused, its folders) beside it. ``template`` and ``system_prompt``
    are recorded so generation renders prompts the way training did.
    """
    os.makedirs(folder, exist_ok=True)
    state = merge_lora_state_dict({k: v.detach().cpu() for k, v in state.items()}, lora_scalings(model))
    lm_tensors, vocab_rows = _language_model_tensors(state, model, len(tokenizer))
    lm_dir = os.path.join(folder, LANGUAGE_DIR)
    token_ids = special_token_ids(tokenizer)
    lm_config = copy.deepcopy(model.language_model.config)
    lm_config.vocab_size = vocab_rows
    # The LM's config may name other ids than the tokenizer trained with (LLaMA's
    # defaults, a base model's config under a chat tokenizer): generate() would then
    # never stop. The tokenizer is what training used, so its ids are the truth.
    for key, value in token_ids.items():
        setattr(lm_config, key, value)
    lm_config.save_pretrained(lm_dir)
    generation_config = copy.deepcopy(getattr(model.language_model, "generation_config", None)) or GenerationConfig()
    generation_config.update(**token_ids)
    generation_config.save_pretrained(lm_dir)
    save_torch_state_dict({k: v.contiguous() for k, v in lm_tensors.items()}, lm_dir)
    tokenizer.save_pretrained(lm_dir)

    fused = len(model.vision.parts) == 2
    processors = image_processor.processors if fused else [image_processor]
    prefixes = ("vision_encoder.first.tower.", "vision_encoder.second.tower.") if fused else ("vision_encoder.tower.",)
    for part, processor, prefix, name in zip(model.vision.parts, processors, prefixes, (VISION_DIR, VISION_DIR_2)):
        vision_dir = os.path.join(folder, name)
        part.tower.config.save_pretrained(vision_dir)
        save_torch_state_dict({k: v.contiguous() for k, v in _split(state, prefix).items()}, vision_dir)
        processor.save_pretrained(vision_dir)

    save_file({k: v.contiguous() for k, v in _split(state, "projector.").items()}, os.path.join(folder, "projector.safetensors"))
    manifest = {
        "format_version": EXPORT_FORMAT,
        # folder paths relative to the export, so it can be moved
        "model": config.exported(LANGUAGE_DIR, VISION_DIR, VISION_DIR_2).to_dict(),
        "trained_with": config.to_dict(),
        "image_tokens_per_image": model.image_tokens.per_image,
        "original_vocab_size": model.image_tokens.original_vocab_size,
        "template": template,
        "system_prompt": system_prompt,
    }
    with open(os.path.join(folder, EXPORT_CONFIG), "w") as f:
        json.dump(manifest, f, indent=2)


def export_config(folder: str) -> tuple[VLMConfig, dict]:
    """The exported model's config (folders resolved inside ``folder``) and the whole manifest."""
    path = os.path.join(folder, EXPORT_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder!r} is not an mmtrain export: {EXPORT_CONFIG} is missing")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    version = manifest.get("format_version")
    if version == 1:
        config = _legacy_config(manifest, path)
    elif version == EXPORT_FORMAT:
        config = VLMConfig.from_dict(manifest["model"], source=path)
    else:
        raise ConfigError(f"{path}: export format {version} is not one this mmtrain reads (1, {EXPORT_FORMAT})")
    config.lm_model_name_or_path = os.path.join(folder, config.lm_model_name_or_path)
    config.vision_model_name_or_path = os.path.join(folder, config.vision_model_name_or_path)
    if config.vision_model_name_or_path_2:
        config.vision_model_name_or_path_2 = os.path.join(folder, config.vision_model_name_or_path_2)
    return config, manifest


def _legacy_config(manifest: dict, path: str) -> VLMConfig:
    """Exports written before the config was saved: their few keys, plain causal attention.

    Such an export never recorded its attention; one trained with MMCA was exported (and
    so reloads) without it, and should be exported again from its checkpoint.
    """
    try:
        return VLMConfig(
            lm_model_name_or_path=LANGUAGE_DIR,
            vision_model_name_or_path=VISION_DIR,
            vis_proj=manifest["vis_proj"],
            perceiver_num_queries=manifest["perceiver_num_queries"],
            vision_keep_cls=manifest["vision_keep_cls"],
            vision_feature_layer=-1,
            lang_lora_dim=0,
            vis_lora_dim=0,
        )
    except KeyError as e:
        raise ConfigError(f"{path}: format 1 export without {e}") from None


def load_pretrained(folder: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BuiltModel:
    """Load an export for inference from its config alone; any missing or unexpected tensor is an error."""
    config, manifest = export_config(folder)
    built = build_model(config, dtype=dtype, strict=True)
    projector_path = os.path.join(folder, "projector.safetensors")
    try:
        built.model.projector.load_state_dict(load_file(projector_path), strict=True)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"{projector_path}: {e}") from None
    if built.image_tokens.per_image != manifest["image_tokens_per_image"]:
        raise ConfigError(
            f"{os.path.join(folder, EXPORT_CONFIG)}: {manifest['image_tokens_per_image']} image tokens recorded, "
            f"model gives {built.image_tokens.per_image}"
        )
    built.model.to(device=device, dtype=dtype)
    built.model.eval()
    return built


def prompt_format(folder: str) -> tuple[str, str]:
    """(template, system prompt) an export was trained with."""
    with open(os.path.join(folder, EXPORT_CONFIG)) as f:
        config = json.load(f)
    return config.get("template", "plain"), config.get("system_prompt", "")
