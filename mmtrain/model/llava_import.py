"""Start from a released VLM: a transformers ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration`` folder.

``--vlm_name_or_path FOLDER`` (the llava-hf layout: ``config.json`` of ``model_type``
``llava`` or ``llava_next``, safetensors, tokenizer, processor, chat template) makes the
folder's pieces the model mmtrain builds:

* the vision tower, read at the folder's ``vision_feature_layer``, its CLS token dropped
  for ``vision_feature_select_strategy`` ``default`` and kept for ``full``;
* ``multi_modal_projector`` (Linear -> GELU -> Linear, with biases) as the ``mlp``
  projector, whose layers carry the same names;
* the LM and its head, as the text config's causal-LM class;
* the tokenizer with its image token, which stands alone for every image feature
  (``image_markup`` ``llava``: no ``<im_start>``/``<im_end>`` are added), its embedding
  row being the new-token row that trains; the tokenizer carries the folder's chat
  template, which ``--template chat`` renders;
* the image processor;
* for LLaVA-NeXT, its grid pinpoints as ``image_grid_pinpoints`` (AnyRes tiles, laid out
  as it lays them out: :mod:`mmtrain.model.anyres`) and its ``image_newline`` as the
  projector's.

Everything is read from the folder's config before any weights load; a folder of
another class (Qwen2-VL, Idefics3, ...) is refused naming its class. Each
piece is loaded alone from the folder's safetensors (transformers renames the folder's
keys to the piece's own, either key layout), so a tensor missing for a piece is an
error, never a random weight.

Exported, the model is again a LLaVA folder whose every tensor equals the original's,
except vision layers after ``vision_feature_layer``, which LLaVA computes and discards
and mmtrain does not keep (``VisionEncoder``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from transformers.utils import logging as hf_logging
from transformers import (
    MODEL_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
)

from mmtrain.image_tokens import IMAGE_TOKEN
from mmtrain.model.errors import ConfigError
from mmtrain.model.hf_loading import checked_from_pretrained, safetensors_files
from mmtrain.model.language import language_attention
from mmtrain.model.anyres import NEWLINE
from mmtrain.model.vision import SUPPORTED as SUPPORTED_TOWERS, TowerLayout, TowerSpec, VisionEncoder, processor_pixel_shape, tower_layout

FIELD = "vlm_name_or_path"  # the config field naming the folder: what its errors speak of
SUPPORTED = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}  # model_type: class
# The folder's keys, in the layout transformers writes (language_model.model.*) and in
# the one its own model holds (model.language_model.*), renamed to each piece's names.
_LM_KEYS = {r"^model\.language_model\.": "model.", r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head."}
_VISION_KEYS = {r"^model\.vision_tower\.": "", r"^vision_tower\.": ""}
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_NEWLINE_KEYS = ("model.image_newline", "image_newline")


@dataclass
class LlavaFolder:
    """A LLaVA folder, its config read and checked; weights load piece by piece."""

    path: str
    config: PretrainedConfig  # transformers' LlavaConfig

    @property
    def vision_config(self) -> PretrainedConfig:
        return self.config.vision_config

    @property
    def text_config(self) -> PretrainedConfig:
        return self.config.text_config

    @property
    def tiled(self) -> bool:
        """A LLaVA-NeXT folder: its images are AnyRes tiles."""
        return self.config.model_type == "llava_next"

    @property
    def pinpoints(self) -> str:
        """Its grids as ``image_grid_pinpoints`` reads them (``HEIGHTxWIDTH,...``)."""
        return ",".join(f"{h}x{w}" for h, w in self.config.image_grid_pinpoints)

    @functools.cached_property
    def layout(self) -> TowerLayout:
        """Where the tower's patch features are, at the size of the folder's image processor (of one tile, when tiled)."""
        if self.tiled:
            size = self.vision_config.image_size  # LLaVA-NeXT cuts tiles of its tower's own size
            shape = (self.vision_config.num_channels if hasattr(self.vision_config, "num_channels") else 3, size, size)
        else:
            shape = processor_pixel_shape(self.image_processor(), self.path, FIELD)
        return tower_layout(self.vision_config, shape, self.path, FIELD)

    def tower_spec(self) -> TowerSpec:
        """The folder's tower as a :class:`TowerSpec` (what the AnyRes layout is checked against)."""
        return TowerSpec(self.path, FIELD, self.vision_config, self.image_processor(), self.layout)

    @property
    def has_cls(self) -> bool:
        return self.layout.has_cls

    @property
    def keep_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "full" and self.has_cls

    def tokenizer(self):
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{FIELD} {self.path!r} has no loadable tokenizer: {e}", fields=(FIELD,)) from None
        template = _processor_chat_template(self.path)
        if template and not tokenizer.chat_template:
            tokenizer.chat_template = template  # --template chat renders the folder's own prompts
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if IMAGE_TOKEN in tokenizer.get_vocab() else None
        if token_id != self.config.image_token_id:
            raise ConfigError(
                f"{FIELD} {self.path!r}: its config's image token is id {self.config.image_token_id}, but its tokenizer "
                f"has {IMAGE_TOKEN!r} at {token_id}",
                fields=(FIELD,),
            )
        return tokenizer

    def image_processor(self):
        try:
            return AutoImageProcessor.from_pretrained(self.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{FIELD} {self.path!r} has no image processor: {e}", fields=(FIELD,)) from None

    def vision_encoder(self, model_args, *, dtype: torch.dtype, weights: bool = True) -> VisionEncoder:
        model_cls = MODEL_MAPPING[type(self.vision_config)]
        if weights:
            with _expected_extra_tensors():
                tower = checked_from_pretrained(
                    model_cls, self.path, field=FIELD, config=self.vision_config, key_mapping=_VISION_KEYS, dtype=dtype,
                    attn_implementation=model_args.attn_implementation,
                )
        else:
            tower = AutoModel.from_config(self.vision_config, dtype=dtype, attn_implementation=model_args.attn_implementation)
        return VisionEncoder(tower, model_args.vision_feature_layer, model_args.vision_keep_cls, self.layout)

    def language_model(self, model_args, *, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        attention, _ = language_attention(self.text_config, model_args.attn_implementation)  # the fallback, as for any LM
        if not weights:
            return AutoModelForCausalLM.from_config(self.text_config, dtype=dtype, attn_implementation=attention)
        with _expected_extra_tensors():
            return checked_from_pretrained(
                AutoModelForCausalLM, self.path, field=FIELD, config=self.text_config, key_mapping=_LM_KEYS, dtype=dtype,
                attn_implementation=attention,
            )

    def load_projector(self, projector: torch.nn.Module) -> None:
        """Copy ``multi_modal_projector`` into mmtrain's ``mlp`` projector (same layer names)."""
        tensors = {}
        for key, file in _weight_files(self.path).items():
            prefix = next((p for p in _PROJECTOR_PREFIXES if key.startswith(p)), None)
            if prefix is not None:
                with safe_open(file, "pt") as f:
                    tensors[key[len(prefix) :]] = f.get_tensor(key)
        newline = hasattr(projector, NEWLINE)
        for key, file in _weight_files(self.path).items():
            if key in _NEWLINE_KEYS and newline:
                with safe_open(file, "pt") as f:
                    tensors[NEWLINE] = f.get_tensor(key)
        if newline and NEWLINE not in tensors:
            tensors[NEWLINE] = getattr(projector, NEWLINE).detach().clone()  # a LLaVA-1.5 folder tiled anew: the newline starts fresh
        try:
            projector.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"{FIELD} {self.path!r}: its multi_modal_projector does not fit an mlp projector: {e}", fields=(FIELD,)) from None


@contextlib.contextmanager
def _expected_extra_tensors():
    """Each piece loads from the whole folder, so the other pieces' tensors are expected there:
    transformers' report of them is quieted (missing tensors are still errors, ``checked_from_pretrained``)."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def read_folder(path: str) -> LlavaFolder:
    """The folder's config, checked: its class, towers and projector must be what mmtrain builds."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"{FIELD} {path!r} is not a folder with a config.json", fields=(FIELD,))
    try:
        with open(config_file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{FIELD} {config_file}: not JSON ({e})", fields=(FIELD,)) from None
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED or any(a != SUPPORTED[model_type] for a in architectures):
        held = ", ".join(architectures) or "no architectures"
        supported = ", ".join(f"{c} (model_type {t!r})" for t, c in SUPPORTED.items())
        raise ConfigError(f"{FIELD} {path!r} holds {held} (model_type {model_type!r}); supported, in the llava-hf layout: {supported}", fields=(FIELD,))
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers validates each field, with errors of several classes
        reason = " ".join(str(e).split())
        raise ConfigError(f"{FIELD} {path!r}: cannot read its LLaVA config: {reason}", fields=(FIELD,)) from None
    vision, text = config.vision_config, config.text_config
    missing = [k for k in ("hidden_size", "num_hidden_layers", "patch_size") if not isinstance(getattr(vision, k, None), int)]
    if missing or type(vision) not in MODEL_MAPPING:
        raise ConfigError(f"{FIELD} {path!r}: its vision tower is a {type(vision).__name__}; supported: {SUPPORTED_TOWERS}", fields=(FIELD,))
    if type(text) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{FIELD} {path!r}: its text config {type(text).__name__} has no causal-LM class in transformers", fields=(FIELD,))
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ConfigError(
            f"{FIELD} {path!r}: its projector (act {config.projector_hidden_act!r}, bias "
            f"{getattr(config, 'multimodal_projector_bias', True)}) is not the mlp projector (Linear -> GELU -> Linear with biases)",
            fields=(FIELD,),
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ConfigError(
            f"{FIELD} {path!r}: vision_feature_layer {config.vision_feature_layer} concatenates several layers; "
            "one layer is supported",
            fields=(FIELD,),
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ConfigError(f"{FIELD} {path!r}: vision_feature_select_strategy {strategy!r}; supported: default, full", fields=(FIELD,))
    folder = LlavaFolder(path, config)
    if strategy == "default" and not folder.has_cls:
        raise ConfigError(
            f"{FIELD} {path!r}: vision_feature_select_strategy 'default' drops the first feature, and its "
            f"{type(vision).__name__} tower has no CLS token there (only 'full' fits it)",
            fields=(FIELD,),
        )
    return folder


def resolve(model_config) -> None:
    """Set the settings a LLaVA folder decides on ``model_config`` (a ``VLMConfig``); no weights read.

    The folder stands for both towers, so both paths name it; the feature layer and the
    CLS choice are the folder's, the projector is ``mlp`` and the image token its own.
    """
    folder = read_folder(model_config.vlm_name_or_path)
    if model_config.vis_proj != "mlp":
        raise ConfigError(
            f"vis_proj {model_config.vis_proj!r}: {FIELD} {folder.path!r} brings its own projector, an mlp; "
            "drop vis_proj or give vis_proj mlp",
            fields=("vis_proj", FIELD),
        )
    model_config.lm_model_name_or_path = folder.path
    model_config.vision_model_name_or_path = folder.path
    model_config.vision_feature_layer = folder.config.vision_feature_layer
    model_config.vision_keep_cls = folder.keep_cls
    model_config.image_markup = "llava"
    if folder.tiled and not (model_config.image_grid_pinpoints or model_config.anyres_max_tiles):
        model_config.image_grid_pinpoints = folder.pinpoints  # its own grids, unless the run asks for others


def looks_like_llava_folder(path: str) -> bool:
    """Whether ``path`` is a transformers LLaVA folder (its config.json says so)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") in SUPPORTED
    except (OSError, ValueError, AttributeError):
        return False


def _processor_chat_template(path: str) -> str | None:
    """The chat template the folder's processor carries (chat_template.jinja or .json)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    template = json.load(f).get("chat_template")
            except (ValueError, AttributeError):
                continue
            if template:
                return template
    return None


def _weight_files(folder: str) -> dict[str, str]:
    files = safetensors_files(folder)
    if files is None:
        raise ConfigError(f"{FIELD} {folder!r} holds no model.safetensors (nor a sharded index)", fields=(FIELD,))
    return files
