"""What one training configuration is, and what the model is: the inputs of every estimate.

:class:`MemorySetup` is one rank's configuration (ZeRO stage, offload, GPUs, micro-batch,
sequence length, precision, checkpointing); :class:`ModelFacts` holds the counts and
shapes of a model, read from the very model the trainer builds, on the meta device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mmtrain.model.config import VLMConfig
from mmtrain.model.errors import ConfigError

OFFLOADS = ("none", "optimizer", "optimizer+params")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}
GiB = 2**30

LORA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def in_gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def largest_micro_batch(micro_batch: int, seq_len: int, max_tokens_per_batch: int | None = None) -> tuple[int, int]:
    """``(rows, tokens per row)`` of a run's largest micro-batch: ``micro_batch`` rows of
    ``seq_len`` tokens, or with a token budget one packed row of the whole budget."""
    return (1, max_tokens_per_batch) if max_tokens_per_batch else (micro_batch, seq_len)


@dataclass(frozen=True)
class MemorySetup:
    """One training configuration of one rank."""

    zero_stage: int = 0
    offload: str = "none"  # none | optimizer | optimizer+params (stage 3 only)
    num_gpus: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    images_per_sample: int = 1
    label_fraction: float = 0.25  # share of the text tokens that carry a label (answers)
    param_persistence_threshold: int = 10_000
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters (DeepSpeed's default)
    compiled: bool = False  # LM decoder layers compiled (--torch_compile; on by default on a GPU)
    fp8_base: bool = False  # LM decoder layers' frozen Linears in float8 (--fp8_base; ZeRO 0-2 only)
    fp8_vision: bool = False  # the vision tower's frozen Linears in float8 (--fp8_vision)
    nf4_base: bool = False  # LM decoder layers' frozen Linears in 4-bit NF4 (--quantize_base nf4; ZeRO 0-2 only)
    nf4_vision: bool = False  # the vision tower's frozen Linears in NF4 (--quantize_vision nf4)
    # --objective dpo: micro_batch counts pairs (two rows each, images once), and the
    # reference keeps a starting copy of every trained tensor but fresh LoRA (switched off)
    preference_pairs: bool = False
    # --dpo_share_prompt: a pair is one row of its prompt once and both answers (the answers
    # being label_fraction of a row's text tokens), not two whole rows
    shared_prompt: bool = False
    # --sequence_parallel_size: each row's positions split over this many of the GPUs (a divisor of num_gpus)
    sequence_parallel: int = 1
    # --precompute_ref: those copies live only while the reference's log-probabilities are
    # computed, before the first step, and are freed then
    precompute_ref: bool = False

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"offload must be one of {', '.join(OFFLOADS)}, got {self.offload!r}")
        if self.offload != "none" and self.zero_stage == 0:
            raise ConfigError("offload needs ZeRO stage 1-3")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise ConfigError("parameter offload needs ZeRO stage 3")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("num_gpus", "micro_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise ConfigError(f"label_fraction must be in [0, 1], got {self.label_fraction}")
        if self.sequence_parallel < 1 or self.num_gpus % self.sequence_parallel:
            raise ConfigError(f"sequence_parallel must be >= 1 and divide num_gpus ({self.num_gpus}), got {self.sequence_parallel}")
        if (self.fp8_base or self.fp8_vision) and self.zero_stage == 3:
            raise ConfigError("float8 frozen weights (--fp8_base, --fp8_vision) are refused at ZeRO stage 3, as training refuses them")
        if (self.nf4_base or self.nf4_vision) and self.zero_stage == 3:
            raise ConfigError("4-bit frozen weights (--quantize_base, --quantize_vision) are refused at ZeRO stage 3, as training refuses them")
        if (self.nf4_base and self.fp8_base) or (self.nf4_vision and self.fp8_vision):
            raise ConfigError("a frozen weight is held in float8 or in NF4, not both")

    @property
    def name(self) -> str:
        off = {"none": "", "optimizer": "+off-opt", "optimizer+params": "+off-opt+par"}[self.offload]
        fp8 = ("+fp8" if self.fp8_base else "") + ("+fp8vis" if self.fp8_vision else "")
        fp8 += ("+nf4" if self.nf4_base else "") + ("+nf4vis" if self.nf4_vision else "")
        sp = f"+sp{self.sequence_parallel}" if self.sequence_parallel > 1 else ""
        return f"zero{self.zero_stage}{off}" + ("+ckpt" if self.gradient_checkpointing else "") + ("+compiled" if self.compiled else "") + fp8 + sp


@dataclass(frozen=True)
class ModelFacts:
    """Everything the memory model needs to know about a model, read from one meta build."""

    params: tuple[tuple[int, bool, bool], ...]  # (numel, trainable, inside the engine) per parameter
    largest_module: int  # most direct parameters of one engine module
    counts: dict  # component -> {"total", "trainable"} (count_parameters)
    hidden: int
    layers: int
    heads: int
    kv_dim: int
    intermediate: int
    vocab: int
    lora_rank: int
    lora_dropout: float
    lora_per_layer: dict  # kind -> adapted layers / layers
    lora_linears: int  # adapted Linear layers in the LM
    lm_trained_layers: int  # decoder layers whose own weights train (--lm_training full / last_layers)
    projector: str
    image_tokens: int  # LM positions of one image's features (with AnyRes tiles, of the largest grid's image)
    patches: int  # vision features fed to the projector (of one tile)
    perceiver_queries: int
    vision_hidden: int  # width of the features fed to the projector (both towers' when fused)
    vision_towers: tuple  # VisionTowerFacts of each tower, in the order they run
    vision_trainable: bool
    vision_lora_rank: int
    # Frozen Linear weights --fp8_base / --fp8_vision would hold in float8, and their scales (one per output channel).
    fp8_base_weights: int = 0
    fp8_base_scales: int = 0
    fp8_vision_weights: int = 0
    fp8_vision_scales: int = 0
    # Frozen Linear weights --quantize_base / --quantize_vision nf4 would hold in 4 bits.
    nf4_base_weights: int = 0
    nf4_vision_weights: int = 0
    nf4_largest: int = 0  # the largest of those Linears: one is dequantised at a time in each product
    tiles_per_image: int = 1  # encoder inputs of one image: 1, or with AnyRes tiles the whole image and its largest grid's tiles

    def total(self, trainable: bool | None = None, engine: bool | None = None) -> int:
        return sum(
            n for n, t, e in self.params if (trainable is None or t == trainable) and (engine is None or e == engine)
        )

    def persistent(self, threshold: int, trainable: bool) -> int:
        """Engine parameters small enough to stay whole at stage 3."""
        return sum(n for n, t, e in self.params if e and t == trainable and n < threshold)


def _largest_image(image_tokens) -> tuple[int, int]:
    """(LM positions, encoder inputs) of the costliest image: with AnyRes tiles one that fills the largest grid."""
    anyres = image_tokens.anyres
    if anyres is None:
        return image_tokens.per_image, 1
    return max((anyres.features(p), anyres.tiles(p)) for p in anyres.pinpoints)


@dataclass(frozen=True)
class VisionTowerFacts:
    """One vision tower's shapes, as the memory model needs them."""

    hidden: int
    intermediate: int
    layers: int  # layers actually run (after the read-out layer)
    tokens: int  # tokens inside the tower (CLS and registers included)
    pixels: int  # values of one image's pixel tensor (C x H x W)
    features: int  # values of one image's features it returns (patches x width)


def _tower_facts(part) -> VisionTowerFacts:
    config = part.tower.config
    layout = part.layout
    intermediate = getattr(config, "intermediate_size", None) or int(config.hidden_size * getattr(config, "mlp_ratio", 4))
    c, h, w = layout.pixel_shape
    return VisionTowerFacts(
        hidden=config.hidden_size,
        intermediate=intermediate,
        layers=config.num_hidden_layers,
        tokens=layout.patches + layout.prefix_tokens,
        pixels=c * h * w,
        features=part.num_patches * part.hidden_size,
    )


def _key(config: VLMConfig) -> tuple:
    return tuple(sorted(asdict(config.model_config()).items()))


_FACTS_CACHE: dict[tuple, ModelFacts] = {}


def model_facts(model_args: VLMConfig) -> ModelFacts:
    """Counts and shapes of the model ``model_args`` describes (the command line's flags are one), from a meta-device build (cached)."""
    key = _key(model_args)
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    from mmtrain.model.builder import build_model
    from mmtrain.model.counting import count_parameters, numel
    from mmtrain.model.lora import is_lora_parameter

    built = build_model(model_args, meta=True)
    model = built.model

    def in_engine(name: str) -> bool:
        # A frozen vision encoder is kept out of the DeepSpeed engine (mmtrain.training.engine_view).
        return model.vision_trainable or not name.startswith("vision_encoder.")

    params = tuple((numel(p), bool(p.requires_grad), in_engine(name)) for name, p in model.named_parameters())
    largest = max(
        sum(numel(p) for p in m.parameters(recurse=False)) for name, m in model.named_modules() if in_engine(name + ".")
    )
    counts = {c.name: {"total": c.total, "trainable": c.trainable} for c in count_parameters(model)}

    lm_config = model.language_model.config
    hidden = lm_config.hidden_size
    heads = lm_config.num_attention_heads
    head_dim = getattr(lm_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(lm_config, "num_key_value_heads", None) or heads
    layers = lm_config.num_hidden_layers
    targets = built.lora_targets.get("language_model", [])
    from mmtrain.model.decoder_layers import decoder_layers

    trained_layers = sum(
        any(p.requires_grad and not is_lora_parameter(n) for n, p in layer.named_parameters())
        for layer in decoder_layers(model.language_model)
    )
    per_kind = {k: sum(1 for t in targets if t.rsplit(".", 1)[-1] == k) / layers for k in LORA_KINDS}
    from mmtrain.model.builder import float8_scopes
    from mmtrain.model.fp8 import convertible_linears

    fp8 = {part: convertible_linears(root, scopes) for part, (root, scopes) in float8_scopes(model).items()}
    from mmtrain.model.nf4 import quantizable_linears

    nf4 = {part: quantizable_linears(root, scopes) for part, (root, scopes) in float8_scopes(model).items()}

    vision = model.vision
    projector = model.projector
    facts = ModelFacts(
        params=params,
        largest_module=largest,
        counts=counts,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_dim=kv_heads * head_dim,
        intermediate=lm_config.intermediate_size,
        vocab=model.language_model.get_output_embeddings().weight.shape[0],
        lora_rank=model_args.lang_lora_dim,
        lora_dropout=model_args.lang_lora_dropout,
        lora_per_layer=per_kind,
        lora_linears=len(targets),
        lm_trained_layers=trained_layers,
        projector=model_args.vis_proj,
        image_tokens=_largest_image(built.image_tokens)[0],
        tiles_per_image=_largest_image(built.image_tokens)[1],
        patches=vision.num_patches,
        perceiver_queries=getattr(projector, "num_tokens", 0),
        vision_hidden=vision.hidden_size,
        vision_towers=tuple(_tower_facts(part) for part in vision.parts),
        vision_trainable=model.vision_trainable,
        vision_lora_rank=model_args.vis_lora_dim,
        fp8_base_weights=sum(numel(m.weight) for m in fp8["base"]),
        fp8_base_scales=sum(m.out_features for m in fp8["base"]),
        fp8_vision_weights=sum(numel(m.weight) for m in fp8["vision"]),
        fp8_vision_scales=sum(m.out_features for m in fp8["vision"]),
        nf4_base_weights=sum(numel(m.weight) for m in nf4["base"]),
        nf4_vision_weights=sum(numel(m.weight) for m in nf4["vision"]),
        nf4_largest=max((numel(m.weight) for m in nf4["base"] + nf4["vision"]), default=0),
    )
    _FACTS_CACHE[key] = facts
    return facts



def ref_model_args(workload: str = "ref-7b") -> VLMConfig:
    """The model of a reference workload (see the project's workload definitions)."""
    if workload == "ref-7b":
        return VLMConfig(
            lm_model_name_or_path="llama-2-7b",
            vision_model_name_or_path="clip-vit-large-patch14-336",
            vis_proj="mlp",
            lang_lora_dim=16,
        )
    if workload == "ref-13b":
        return VLMConfig(
            lm_model_name_or_path="llama-2-13b",
            vision_model_name_or_path="clip-vit-bigG-14",
            vis_proj="perceiver",
            lang_lora_dim=16,
        )
    raise ConfigError(f"unknown workload {workload!r}; known: ref-7b, ref-13b")
