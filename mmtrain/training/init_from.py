"""Start a run from an earlier run's trained parts: ``--init_from EXPORT_OR_CHECKPOINT``.

LLaVA's stage 2 starts from stage 1's projector. The earlier run is either an export
(``OUTPUT/epoch-N``: the projector in ``projector.safetensors``, the image tokens' rows
inside the LM's embedding table, adapters fused) or a checkpoint
(``OUTPUT/checkpoints/step-N``: the trainable tensors under the model's own names,
adapters separate). Only tensors are taken: the new run has its own data, schedule and
optimizer state (``--resume_from_checkpoint`` is for continuing a run instead).

Strict about shapes: before any weights load, each tensor to be taken is compared with
the same tensor of this run's model (built on the meta device), and every mismatch is
named. The log then says what was taken, tensor by tensor count.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.model.builder import build_model
from mmtrain.model.config import VLMConfig
from mmtrain.model.errors import ConfigError
from mmtrain.model.hf_loading import safetensors_files
from mmtrain.model.llava_import import looks_like_llava_folder
from mmtrain.model.lora import is_lora_parameter
from mmtrain.model.pretrained import EXPORT_CONFIG, LANGUAGE_DIR
from mmtrain.training.checkpoint import MANIFEST

logger = logging.getLogger("mmtrain")

PART_OF = {
    "projector": lambda name: name.startswith("projector."),
    "new_rows": lambda name: name.endswith(".new_rows"),
    "lm_lora": lambda name: name.startswith("language_model.") and is_lora_parameter(name),
    "vision_lora": lambda name: name.startswith("vision_encoder.") and is_lora_parameter(name),
}
# What decides whether two runs' parts have the same shapes and meaning.
_ARCHITECTURE = ("vis_proj", "perceiver_num_queries", "vision_keep_cls", "lang_lora_dim", "lang_lora_module_name", "vis_lora_dim", "vis_lora_module_name")


@dataclass
class InitSource:
    """An earlier run, read and checked against this run's model; tensors load on :meth:`tensors`."""

    path: str
    kind: str  # "export" or "checkpoint"
    parts: list[str]
    names: dict[str, list[str]] = field(default_factory=dict)  # part -> this model's parameter names
    manifest: dict = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)  # this model's shape of each tensor taken

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to take, under this model's parameter names, their shapes checked."""
        wanted = {n for names in self.names.values() for n in names}
        if self.kind == "export":
            tensors = _export_tensors(self.path, self.manifest, {n: self.shapes[n] for n in wanted})
        else:
            tensors = _checkpoint_tensors(self.path, self.manifest, wanted)
        wrong = [f"{n} is {list(t.shape)} there, {list(self.shapes[n])} here" for n, t in sorted(tensors.items()) if tuple(t.shape) != self.shapes[n]]
        if wrong:
            raise ConfigError(f"--init_from {self.path!r} does not fit this model: " + "; ".join(wrong))
        return tensors


def check_source(path: str, config: VLMConfig, parts: list[str]) -> InitSource:
    """Read ``--init_from`` and compare it with ``config``'s model, shapes included; no weights are read."""
    if not os.path.isdir(path):
        raise ConfigError(f"--init_from {path!r}: no such folder")
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        kind = "export"
        manifest = _read_json(os.path.join(path, EXPORT_CONFIG))
        recorded = manifest.get("trained_with") or manifest.get("model") or {}
    elif os.path.isfile(os.path.join(path, MANIFEST)):
        kind = "checkpoint"
        manifest = _read_json(os.path.join(path, MANIFEST))
        recorded = manifest.get("model_config") or manifest.get("model") or {}
    elif looks_like_llava_folder(path):
        raise ConfigError(
            f"--init_from {path!r} is a transformers LLaVA folder, which is a whole model rather than an earlier run's "
            f"parts: start from it with --vlm_name_or_path {path}"
        )
    else:
        raise ConfigError(
            f"--init_from {path!r} is neither an export ({EXPORT_CONFIG}) nor a checkpoint ({MANIFEST}); "
            "give OUTPUT/epoch-N or OUTPUT/checkpoints/step-N"
        )
    if kind == "export":
        fused = [p for p in parts if p.endswith("lora")]
        if fused:
            raise ConfigError(
                f"--init_from {path!r} is an export, where LoRA is fused into the weights, so --init_parts {' '.join(fused)} "
                f"cannot be taken from it; start from one of its run's checkpoints, or from its weights with "
                f"--lm_model_name_or_path {os.path.join(path, LANGUAGE_DIR)}"
            )
    model = build_model(config, meta=True).model
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    source_shapes = _export_shapes(path, manifest, model) if kind == "export" else _checkpoint_shapes(manifest)
    source = InitSource(path, kind, list(parts), manifest=manifest, shapes=shapes)
    problems = []
    for part in parts:
        mine = sorted(n for n in shapes if PART_OF[part](n))
        theirs = sorted(n for n in source_shapes if PART_OF[part](n))
        if not mine:
            problems.append(f"{part}: this run's model has none")
            continue
        if not theirs:
            problems.append(f"{part}: the {kind} has none")
            continue
        if mine != theirs:
            only_here, only_there = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            problems.append(f"{part}: tensors differ (only here: {_few(only_here)}; only in the {kind}: {_few(only_there)})")
            continue
        for name in mine:
            if source_shapes[name] is not None and tuple(source_shapes[name]) != shapes[name]:
                problems.append(f"{part}: {name} is {list(source_shapes[name])} in the {kind}, {list(shapes[name])} here")
        source.names[part] = mine
    if problems:
        differ = [f"--{k} {recorded.get(k)!r} there, {getattr(config, k)!r} here" for k in _ARCHITECTURE + ("lm_model_name_or_path", "vision_model_name_or_path", "vision_model_name_or_path_2") if k in recorded and recorded.get(k) != getattr(config, k)]
        raise ConfigError(
            f"--init_from {path!r} does not fit this model: " + "; ".join(problems) + (f" (settings: {'; '.join(differ)})" if differ else "")
        )
    return source


def load_parts(model: torch.nn.Module, source: InitSource) -> list[str]:
    """Copy the source's tensors into ``model`` (before the optimizer exists); returns the report's lines."""
    tensors = source.tensors()
    params = dict(model.named_parameters())
    lines = []
    for part, names in source.names.items():
        values = 0
        for name in names:
            _copy_into(params[name], tensors[name])
            values += tensors[name].numel()
        lines.append(f"{part}: {len(names)} tensor{'' if len(names) == 1 else 's'}, {values:,} values")
    logger.info(f"--init_from {source.path} ({source.kind}): took " + "; ".join(lines) + "; everything else as built")
    return lines


def _copy_into(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        if deepspeed_compat.is_zero3_partitioned(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value.to(param.dtype))
        else:
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--init_from: {path} is not JSON ({e})") from None


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "none"


# Exports: the projector file, and the new rows inside the LM's embedding table.


def _lm_files(folder: str) -> dict[str, str]:
    files = safetensors_files(folder)
    if files is None:
        raise ConfigError(f"--init_from: {folder} holds no model.safetensors")
    return files


def _embedding_key(files: dict[str, str], folder: str, new_rows: str) -> str:
    """The export's input table, under the LM's own name (embed_tokens, embed_in, word_embeddings, ...) of this model's ``new_rows``."""
    key = new_rows.removeprefix("language_model.").removesuffix("new_rows") + "weight"
    if key not in files:
        raise ConfigError(f"--init_from: {folder} has no {key} to take the new rows from")
    return key


def _export_shapes(path: str, manifest: dict, model) -> dict[str, tuple | None]:
    shapes: dict[str, tuple | None] = {}
    projector = os.path.join(path, "projector.safetensors")
    with safe_open(projector, "pt") as f:
        for key in f.keys():
            shapes[f"projector.{key}"] = tuple(f.get_slice(key).get_shape())
    lm_dir = os.path.join(path, LANGUAGE_DIR)
    files = _lm_files(lm_dir)
    new_rows = next(n for n, _ in model.named_parameters() if n.endswith(".new_rows"))
    key = _embedding_key(files, lm_dir, new_rows)
    with safe_open(files[key], "pt") as f:
        rows, width = f.get_slice(key).get_shape()
    tokens = model.image_tokens
    first, count = manifest.get("original_vocab_size"), dict(model.named_parameters())[new_rows].shape[0]
    if first != tokens.original_vocab_size or rows < first + count:
        # Another tokenizer: the rows would mean other tokens.
        shapes[new_rows] = (f"rows {first}.. of a {rows}-row table", width)
    else:
        shapes[new_rows] = (count, width)
    return shapes


def _export_tensors(path: str, manifest: dict, wanted: dict[str, tuple]) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(os.path.join(path, "projector.safetensors"), "pt") as f:
        for key in f.keys():
            if f"projector.{key}" in wanted:
                out[f"projector.{key}"] = f.get_tensor(key)
    new_rows = [n for n in wanted if n.endswith(".new_rows")]
    if new_rows:
        lm_dir = os.path.join(path, LANGUAGE_DIR)
        files = _lm_files(lm_dir)
        key = _embedding_key(files, lm_dir, new_rows[0])
        first = manifest["original_vocab_size"]
        with safe_open(files[key], "pt") as f:
            out[new_rows[0]] = f.get_slice(key)[first : first + wanted[new_rows[0]][0]]
    return out


# Checkpoints: the trainable tensors, as Accelerate or DeepSpeed wrote them.


def _checkpoint_shapes(manifest: dict) -> dict[str, None]:
    # A checkpoint's manifest names its tensors but not their shapes; those are checked on load.
    return {name: None for name in manifest.get("trainable_parameters", [])}


def _checkpoint_tensors(path: str, manifest: dict, wanted: set[str]) -> dict[str, torch.Tensor]:
    stage = manifest.get("zero_stage")
    if stage is None:
        file = os.path.join(path, "model.safetensors")
        if os.path.isfile(file):
            with safe_open(file, "pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys() if k in wanted}
        else:
            state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    elif stage == 3:
        # Partitioned across ranks: DeepSpeed's own reader puts the fp32 partitions together.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(path, tag="pytorch_model", exclude_frozen_parameters=True)
    else:
        file = os.path.join(path, "pytorch_model", "mp_rank_00_model_states.pt")
        state = torch.load(file, map_location="cpu", weights_only=False)["module"]
    missing = sorted(wanted - set(state))
    if missing:
        raise ConfigError(f"--init_from {path}: the checkpoint lacks {_few(missing)}")
    return {k: state[k] for k in wanted}
