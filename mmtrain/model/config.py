"""What the vision-language model *is*: one typed, serialisable description.

``VLMConfig`` names the two towers, how the vision features are read and projected, the
LoRA adapters, the attention kind (MMCA included) and what trains. It is made once from
the command line (``mmtrain.args.ModelArguments`` extends it with the training-only
flags), saved with every checkpoint and export, and it is the only thing
:func:`mmtrain.model.build_model` and :func:`mmtrain.model.load_pretrained` read. An
export's config describes the exported model itself (its own folders, LoRA fused, the
vision tower already cut at the layer read), so loading it needs no flags.

How to *run* the model (fused LoRA, regional compilation, activation checkpointing)
depends on the machine and the ZeRO stage, not on what the model is: those are
:class:`SpeedOptions`, given to the builder beside the config and never saved.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional

from mmtrain import presets
from mmtrain.model.errors import ConfigError
from mmtrain.model.visual_checks import check_visual_inputs

PROJECTORS = ("baseline", "mlp", "vit", "perceiver")
# What of the language model trains; "auto" is LoRA when --lang_lora_dim > 0, else frozen.
LM_TRAINING = ("auto", "frozen", "lora", "full", "last_layers")
ATTENTION_KERNELS = ("sdpa", "eager")
CONFIG_VERSION = 1
# Identity settings added after checkpoints recording an identity existed, with the value
# every earlier run had (its LM trained as --lang_lora_dim said, its head frozen).
ADDED_TO_IDENTITY = {
    "lm_training": "auto", "lm_trainable_layers": 0, "train_lm_head": False, "vision_model_name_or_path_2": None,
    "vlm_name_or_path": "", "image_markup": "mmtrain", "image_grid_pinpoints": "", "anyres_max_tiles": 0, "vision_max_patches": 0,
    "video_pool": 0,
}
# --lang_lora_module_name auto: the decoder layers, wherever the LM keeps them.
LORA_SCOPE_AUTO = "auto"
# Identity settings whose default changed, {setting: (earlier default, new default)}. The
# two name the same model: --lang_lora_module_name was "model.layers.", which matched only
# in LMs whose decoder layers are at model.layers, exactly the Linears "auto" finds there
# (elsewhere it matched nothing, and no run could be recorded with it).
SAME_AS_BEFORE = {"lang_lora_module_name": ("model.layers.", LORA_SCOPE_AUTO)}


def _doc(text: str, **kw) -> dict:
    # the field's documentation; the command line shows it as the flag's help
    return {"help": text, **kw}


@dataclass
class VLMConfig:
    lm_model_name_or_path: str = field(
        default="tiny-llama",
        metadata=_doc("Causal LM: a local Hugging Face folder or a preset (" + ", ".join(presets.preset_names("language")) + ")."),
    )
    vision_model_name_or_path: str = field(
        default="tiny-clip",
        metadata=_doc(
            "Vision encoder: a local Hugging Face vision-transformer folder (CLIP, SigLIP, SigLIP2, DINOv2, ViT, ...) "
            "or a preset (" + ", ".join(presets.preset_names("vision")) + ")."
        ),
    )
    vision_model_name_or_path_2: Optional[str] = field(
        default=None,
        metadata=_doc(
            "A second vision encoder whose features are fused with the first's (concatenated per patch, as prismatic's "
            "DINOv2 + SigLIP): both must have the same patch grid. Each image goes through each encoder's own image processor."
        ),
    )
    vlm_name_or_path: str = field(
        default="",
        metadata=_doc(
            "Start from a transformers LLaVA or LLaVA-NeXT folder (LlavaForConditionalGeneration, "
            "LlavaNextForConditionalGeneration; llava-hf layout): its vision tower, projector (as mlp), LM, image token, "
            "tokenizer, image processor and chat template (LLaVA-NeXT's grids as --image_grid_pinpoints, its newline too); "
            "its vision_feature_layer and vision_feature_select_strategy set --vision_feature_layer and --vision_keep_cls, "
            "and both model paths name it."
        ),
    )
    image_markup: Literal["mmtrain", "llava"] = field(
        default="mmtrain",
        metadata=_doc(
            "How an image sits in the sequence: mmtrain (<im_start>, one <image> per feature, <im_end>; tokens added) or "
            "llava (the tokenizer's own <image> per feature, nothing added; set by --vlm_name_or_path)."
        ),
    )
    vis_proj: str = field(default="mlp", metadata=_doc(f"Projector from vision to LM width: one of {', '.join(PROJECTORS)}."))
    vision_feature_layer: int = field(
        default=-2, metadata=_doc("Hidden layer of the vision encoder (of each, when two are fused) whose output is projected (-2: second to last, as LLaVA and prismatic).")
    )
    vision_keep_cls: bool = field(default=False, metadata=_doc("Keep the CLS token of towers that have one (CLIP, DINOv2; dropped by default). Register tokens are always dropped."))
    image_grid_pinpoints: str = field(
        default="",
        metadata=_doc(
            "AnyRes tiles (LLaVA-NeXT's high resolution): the grids an image may be resized into, HEIGHTxWIDTH in pixels, "
            "comma-separated, each a multiple of the encoder's image size (e.g. 672x336,336x672,672x672,1008x336,336x1008 "
            "for a 336 px encoder). Each image is encoded whole plus as the tiles of its best-fitting grid, and its tile "
            "features are unpadded to its aspect ratio with a learned newline per feature row. Empty: one fixed square."
        ),
    )
    anyres_max_tiles: int = field(
        default=0,
        metadata=_doc(
            "AnyRes tiles from a tile budget instead of --image_grid_pinpoints: every grid of at most this many tiles of the "
            "encoder's image size (4: 1x1 ... 2x2, 1x4, 4x1), plus the whole image (0: off)."
        ),
    )
    vision_max_patches: int = field(
        default=0,
        metadata=_doc(
            "Native aspect ratio for a SigLIP2 (NaFlex) tower: each image resized, keeping its aspect ratio, to at most this "
            "many patches, read at its own grid (its token count follows its size). 0: the tower's fixed square grid."
        ),
    )
    video_pool: int = field(
        default=0,
        metadata=_doc(
            "Videos: 0 reads none; k >= 1 adds the <video> token, encodes each sampled frame at the encoder's own image "
            "size and average-pools its patch features k x k on the patch grid before the projector (1: no pooling; 2: "
            "LLaVA-NeXT-Video's), so a frame takes (grid side // k)^2 positions."
        ),
    )
    perceiver_num_queries: int = field(default=64, metadata=_doc("Learned queries of the perceiver projector (image tokens per image)."))
    lang_lora_dim: int = field(default=16, metadata=_doc("LoRA rank on the language model (0: no LoRA)."))
    lang_lora_module_name: str = field(
        default=LORA_SCOPE_AUTO,
        metadata=_doc(
            "LoRA goes on every Linear of the LM whose name contains this scope; auto: every Linear of the LM's "
            "decoder layers, found from the model (model.layers. of LLaMA, gpt_neox.layers. of GPT-NeoX, transformer.h. of Falcon)."
        ),
    )
    lang_lora_alpha: Optional[float] = field(default=None, metadata=_doc("LoRA alpha on the LM (default: 2 x the rank, scale 2, as LLaVA-1.5: rank 128, alpha 256)."))
    lang_lora_dropout: float = field(default=0.0, metadata=_doc("LoRA dropout on the LM."))
    vis_lora_dim: int = field(default=0, metadata=_doc("LoRA rank on the vision encoder (0: no LoRA, encoder fully frozen)."))
    vis_lora_module_name: str = field(
        default="encoder.layers.", metadata=_doc(
            "LoRA goes on every Linear of the vision encoder whose name contains this scope "
            "(the layer lists: CLIP, SigLIP, SigLIP2 encoder.layers.; DINOv2 encoder.layer.; ViT layers.)."
        ),
    )
    vis_lora_alpha: Optional[float] = field(default=None, metadata=_doc("LoRA alpha on the vision encoder (default: 2 x the rank, scale 2)."))
    vis_lora_dropout: float = field(default=0.0, metadata=_doc("LoRA dropout on the vision encoder."))
    only_optimize_lora: bool = field(
        default=False, metadata=_doc("Inside the LM and vision encoder train LoRA only (new-token embedding rows stay frozen too).")
    )
    lm_training: str = field(
        default="auto",
        metadata=_doc(
            "What of the language model trains: frozen, lora (needs --lang_lora_dim > 0), full (every weight), "
            "last_layers (the last --lm_trainable_layers decoder layers whole), or auto (lora when --lang_lora_dim > 0, else frozen)."
        ),
    )
    lm_trainable_layers: int = field(default=0, metadata=_doc("Decoder layers trained whole, counted from the last, with --lm_training last_layers."))
    train_full_embeddings: Optional[bool] = field(
        default=None,
        metadata=_doc("Train the whole input-embedding table (default: yes with --lm_training full, else only the new special tokens' rows)."),
    )
    train_lm_head: Optional[bool] = field(
        default=None, metadata=_doc("Train the LM's output head (default: yes with --lm_training full, else no).")
    )
    enable_mmca_attention: bool = field(default=False, metadata=_doc("Multi-modal causal attention in the LM."))
    mmca_image_attention: Literal["same_image", "self"] = field(
        default="same_image",
        metadata=_doc("With MMCA, image tokens attend causally within their own image (same_image) or only to themselves (self)."),
    )
    attn_implementation: str = field(default="sdpa", metadata=_doc("Attention kernel of the LM and vision encoder: sdpa or eager."))
    preset_seed: int = field(default=0, metadata=_doc("Seed of the random weights of preset models."))

    def __post_init__(self):
        if self.vlm_name_or_path:
            from mmtrain.model.llava_import import resolve

            resolve(self)  # reads the folder's config only
        if self.vis_proj not in PROJECTORS:
            raise ConfigError(f"vis_proj {self.vis_proj!r} is not a projector; valid: {', '.join(PROJECTORS)}", fields=("vis_proj",))
        for name in ("lang_lora_dim", "vis_lora_dim"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}", fields=(name,))
        for name in ("lang_lora_dropout", "vis_lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}", fields=(name,))
        if self.perceiver_num_queries < 1:
            raise ConfigError(f"perceiver_num_queries must be >= 1, got {self.perceiver_num_queries}", fields=("perceiver_num_queries",))
        self._check_lm_training()
        check_visual_inputs(self)
        lora = ("only_optimize_lora", "lang_lora_dim", "vis_lora_dim")
        if self.only_optimize_lora and self.lang_lora_dim == 0 and self.vis_lora_dim == 0:
            raise ConfigError("only_optimize_lora needs lang_lora_dim or vis_lora_dim > 0", fields=lora)
        if self.only_optimize_lora and self.train_full_embeddings:
            raise ConfigError(
                "only_optimize_lora and train_full_embeddings contradict each other; pick one", fields=("only_optimize_lora", "train_full_embeddings")
            )
        if self.vision_model_name_or_path_2 == "":
            self.vision_model_name_or_path_2 = None  # an empty flag: one encoder
        if self.attn_implementation not in ATTENTION_KERNELS:
            raise ConfigError(
                f"attn_implementation {self.attn_implementation!r}: valid are {', '.join(ATTENTION_KERNELS)}", fields=("attn_implementation",)
            )

    def _check_lm_training(self) -> None:
        named = ("lm_training", "lang_lora_dim", "lm_trainable_layers", "only_optimize_lora")
        if self.lm_training not in LM_TRAINING:
            raise ConfigError(f"lm_training {self.lm_training!r}: valid are {', '.join(LM_TRAINING)}", fields=named)
        mode = self.lm_mode
        if mode == "lora" and self.lang_lora_dim == 0:
            raise ConfigError("lm_training lora needs lang_lora_dim > 0", fields=named)
        if mode in ("frozen", "full", "last_layers") and self.lang_lora_dim > 0:
            raise ConfigError(
                f"lm_training {mode} and lang_lora_dim {self.lang_lora_dim} contradict each other; "
                "set lang_lora_dim 0 or lm_training lora",
                fields=named,
            )
        if mode == "last_layers" and self.lm_trainable_layers < 1:
            raise ConfigError(f"lm_training last_layers needs lm_trainable_layers >= 1, got {self.lm_trainable_layers}", fields=named)
        if mode != "last_layers" and self.lm_trainable_layers:
            raise ConfigError(f"lm_trainable_layers is only used with lm_training last_layers (now {mode})", fields=named)
        if mode in ("full", "last_layers") and self.only_optimize_lora:
            raise ConfigError(f"only_optimize_lora and lm_training {mode} contradict each other; pick one", fields=named)
        # Resolved once, so that a saved config says what trained.
        if self.train_full_embeddings is None:
            self.train_full_embeddings = mode == "full"
        if self.train_lm_head is None:
            self.train_lm_head = mode == "full"

    @property
    def anyres(self) -> bool:
        """Images are encoded as AnyRes tiles (``image_grid_pinpoints`` or ``anyres_max_tiles``)."""
        return bool(self.image_grid_pinpoints or self.anyres_max_tiles)

    @property
    def lm_mode(self) -> str:
        """``--lm_training`` with ``auto`` resolved: frozen, lora, full or last_layers."""
        if self.lm_training == "auto":
            return "lora" if self.lang_lora_dim > 0 else "frozen"
        return self.lm_training

    @property
    def lm_weights_train(self) -> bool:
        """Some of the LM's own weights (not only adapters or new rows) train."""
        return self.lm_mode in ("full", "last_layers") or self.train_full_embeddings or self.train_lm_head

    @property
    def vision_trainable(self) -> bool:
        """The vision encoder trains (has LoRA); otherwise it is frozen and runs under no_grad."""
        return self.vis_lora_dim > 0

    def model_config(self) -> "VLMConfig":
        """This description alone, as a plain ``VLMConfig`` (drops any fields a subclass adds)."""
        return VLMConfig(**{f.name: getattr(self, f.name) for f in fields(VLMConfig)})

    def to_dict(self) -> dict:
        return {"config_version": CONFIG_VERSION, **asdict(self.model_config())}

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "the model config") -> "VLMConfig":
        """Strict: an unknown key or another version is an error naming ``source``."""
        values = dict(values)
        version = values.pop("config_version", None)
        if version != CONFIG_VERSION:
            raise ConfigError(f"{source}: model config version {version} is not {CONFIG_VERSION}")
        known = {f.name for f in fields(VLMConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config keys {', '.join(unknown)}")
        return VLMConfig(**values)

    def identity(self) -> dict:
        """The settings that decide which parameters exist and what they mean (resume checks these)."""
        keys = (
            "lm_model_name_or_path", "vision_model_name_or_path", "vis_proj", "vision_feature_layer", "vision_keep_cls",
            "perceiver_num_queries", "lang_lora_dim", "lang_lora_module_name", "vis_lora_dim", "vis_lora_module_name",
            "only_optimize_lora", "train_full_embeddings", "preset_seed", "lm_training", "lm_trainable_layers",
            "train_lm_head", "vision_model_name_or_path_2", "vlm_name_or_path", "image_markup", "image_grid_pinpoints",
            "anyres_max_tiles", "vision_max_patches", "video_pool",
        )
        return {k: getattr(self, k) for k in keys}

    def differences(self, recorded: dict) -> list[str]:
        """Settings whose value differs from a recorded :meth:`identity`, as readable lines naming the fields.

        A setting the record lacks counts as different, except those added to the identity
        after records were first written (:data:`ADDED_TO_IDENTITY`): an older record ran
        with their value there. A changed default and its earlier value that build the
        same model (:data:`SAME_AS_BEFORE`) are not a difference.
        """
        lines = []
        for k, v in self.identity().items():
            was = recorded.get(k, ADDED_TO_IDENTITY.get(k))
            if was != v and {was, v} != set(SAME_AS_BEFORE.get(k, ())):
                lines.append(f"{k}: recorded {was!r}, now {v!r}")
        return lines

    def exported(self, language_model: str, vision_encoder: str, vision_encoder_2: str | None = None) -> "VLMConfig":
        """The config of this model's export: its own folders, LoRA fused, the towers ending at the layer read."""
        values = asdict(self.model_config())
        values.update(
            lm_model_name_or_path=language_model,
            vision_model_name_or_path=vision_encoder,
            vision_model_name_or_path_2=vision_encoder_2 if self.vision_model_name_or_path_2 else None,
            vlm_name_or_path="",  # the export holds the pieces itself; image_markup stays
            vision_feature_layer=-1,
            lang_lora_dim=0,
            vis_lora_dim=0,
            only_optimize_lora=False,
            lm_training="auto",  # a plain model: whatever trained is in its weights now
            lm_trainable_layers=0,
            train_full_embeddings=False,
            train_lm_head=False,
        )
        return VLMConfig(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class SpeedOptions:
    """How the builder runs the model on this machine; results equal the plain path's (tests/model)."""

    fused_lora: bool = False  # LoRA's low-rank term added inside the base GEMMs
    compile_decoder_layers: bool = False  # regional torch.compile of each LM decoder layer
    compile_hooks_outside: bool = False  # compile each layer's forward only (ZeRO-3: its gather hooks stay eager)
    gradient_checkpointing: bool = False  # recompute LM (and vision LoRA) activations in backward
    gradient_checkpointing_layers: int = 0  # or only the first N LM decoder layers
    lora_inputs_follow_autocast: bool = False  # plain mixed precision: LoRA inputs stay in the autocast dtype
    packed_attention: str | None = None  # LM kernel for packed rows: a varlen kernel (varlen_attention.KERNELS) or "flex_attention" (skips the masked blocks)
    # Float8 frozen weights (mmtrain/model/fp8.py). Not part of VLMConfig: they change how
    # the frozen products are computed, not which weights exist, and an export is always
    # written in the original precision, so a saved config must not ask for float8.
    fp8_base: bool = False  # the LM decoder layers' frozen Linears hold float8 weights
    fp8_vision: bool = False  # the vision tower's frozen Linears too
    fp8_keep_originals: bool = True  # keep the original weights on the CPU (needed where exports are written)
    fp8_device: object = None  # torch.device to quantise on (the GPU); None: where the weights are
    # 4-bit NF4 frozen weights (mmtrain/model/nf4.py), for the same reason not part of VLMConfig:
    # exports hold the dequantised weights with LoRA merged, a plain model.
    nf4_base: bool = False  # the LM decoder layers' frozen Linears hold NF4 weights (--quantize_base nf4)
    nf4_vision: bool = False  # the vision tower's frozen Linears too (--quantize_vision nf4)
    nf4_device: object = None  # torch.device the codes are made on and kept (the GPU); None: where the weights are
