"""Per-GPU memory of a training step: ``python -m mmtrain.memory [model flags] [--json]``.

Predicts the peak *allocated* GPU memory (what ``torch.cuda.max_memory_allocated``
reports) of one rank for a ZeRO stage (0-3), an offload setting, a GPU count, a
micro-batch, a sequence length, a precision and gradient checkpointing, and what
offload moves to host memory. The CUDA context (~0.5 GiB) and the caching
allocator's reserve and fragmentation are *not* in that figure; :func:`recommend`
adds a margin for them when it decides what fits.

Counts come from the model the trainer builds (``build_model(meta=True)`` and
``count_parameters``), shapes from its configs. Notation: Ψ_t trainable parameters
(projector, LoRA, new-token rows), Ψ_f frozen parameters inside the DeepSpeed engine
(the LM, and the vision encoder when it has LoRA), Ψ_v the frozen vision encoder kept
outside the engine (no vision LoRA), N GPUs, w bytes per value of the compute dtype
(2 for bf16/fp16, 4 for fp32), b micro-batch, s sequence length, h/i/L/V the LM's
width, MLP width, layers and vocabulary, a its heads, h_kv = kv heads x head dim.

Model states (Rajbhandari et al. 2020, "ZeRO", sec. 3 and 5: 2Ψ + 2Ψ + KΨ with K=12
for mixed-precision Adam, divided by N for what each stage partitions). Here only
trainable parameters have gradients and optimizer states:

========================  ==================  ==================  ==================
per GPU                   stage 0             stage 1             stage 2 / stage 3
========================  ==================  ==================  ==================
frozen weights            wΨ_v + wΨ_f         wΨ_v + wΨ_f         st.2: wΨ_v + wΨ_f;
                                                                  st.3: wΨ_v + wΨ_f/N
trainable weights         wΨ_t                wΨ_t                st.3: wΨ_t/N
gradients (compute dtype) wΨ_t                wΨ_t                wΨ_t/N
optimizer (fp32 master,   12Ψ_t               12Ψ_t/N             12Ψ_t/N
Adam m and v)
========================  ==================  ==================  ==================

* DeepSpeed keeps gradients in the compute dtype (``grad_accum_dtype`` unset) and an
  fp32 master copy in the optimizer; at the optimizer step the gradient partition is
  cast to fp32 (4Ψ_t, or 4Ψ_t/N with ZeRO): a transient of the step, not of backward.
  In fp32 the master copy is the weight, so the optimizer holds 8 bytes per parameter.
* The frozen vision encoder without LoRA is never given to DeepSpeed (see
  ``mmtrain.model.vlm``): it is replicated whole on every GPU at every stage, in the
  compute dtype, and runs under ``no_grad``.
* Stage 3 leaves parameters below ``stage3_param_persistence_threshold`` elements whole
  on every rank (norm weights, biases); everything else (Ψ_p elements) is partitioned.
  Gathered parameters stay resident up to the live-parameter limit M
  (``stage3_max_live_parameters``, DeepSpeed's default 1e9; the trainer does not set it),
  not just one module: w·min(Ψ_p, max(m, M + p)) bytes, with m the largest module and p
  the largest partitioned parameter (the LM head for ref-7b: M + p = 1.13e9 elements,
  2.1 GiB in bf16). Source: DeepSpeed 0.19.8,
  ``runtime/zero/partitioned_param_coordinator.py``. ``fetch_sub_module`` gathers the
  running module unconditionally, then prefetches the next parameters of the recorded
  trace, whole parameters at a time, while the running total is below
  ``min(M - available, stage3_prefetch_bucket_size)``; ``available`` counts every
  gathered parameter (in flight, in use, or kept by ``stage3_max_reuse_distance``) and
  drops only on release. The prefetch bucket is thus a per-call cap, not a separate
  allowance: each hooked module (containers and parameter-less ones included) prefetches
  again, so within the first decoder layer the gathered set reaches M and overshoots it by
  at most the last parameter added. That happens while activations peak: the LM head,
  the largest parameter, is prefetched at the end of forward and kept for backward.
  With ``stage3_prefetch_bucket_size`` 0 only the running module is gathered (m).
* Optimizer offload (ZeRO-Offload, Ren et al. 2021) moves the fp32 master weights, Adam
  moments and fp32 gradients of each rank's partition to host memory (16Ψ_t/N bytes);
  the GPU keeps only the reduce buckets. Parameter offload (ZeRO-Infinity, stage 3)
  moves each rank's parameter partitions to host memory as well; the GPU then holds the
  persistent small parameters and the gathered working set.
* Communication buffers: ZeRO 1-3 reduce gradients through a contiguous bucket of
  ``reduce_bucket_size`` elements (DeepSpeed's default 5e8, in the gradient dtype);
  stage 0 flattens all gradients for its all-reduce when N > 1 (wΨ_t).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1: s·b·h·(34 + 5·a·s/h) bytes per GPT layer in 16-bit with
dropout). That count does not fit the kernels used here, so each saved tensor of a
Hugging Face LLaMA/Qwen2 decoder layer is counted instead:

* SDPA (flash / memory-efficient kernels) keeps q, k, v, the output and a fp32
  log-sum-exp, never the a·s² score matrix: 2h + 4h_kv + 2h bytes per token + 4a;
  the o_proj input is a view of that output. No dropout anywhere (no masks).
* RMSNorm upcasts its input to fp32 and keeps it: 4h per norm, two norms per layer.
* SwiGLU MLP: gate (kept by SiLU), SiLU output and up (kept by the product): 6i.
* A frozen Linear needs only its weight for the input gradient, so its input is kept
  only when it carries LoRA (LoRA A's weight gradient needs it): +2h for the norm
  output feeding q/k/v, +2h for the one feeding gate/up, +2i for down_proj's input.
  Each LoRA keeps its rank-r intermediate: +2r per adapted Linear. With LoRA dropout > 0
  each adapter also keeps its dropped-out input and a bool mask: +3·(input width) per
  adapted Linear (18h + 3i per layer with every Linear adapted, ~26·s·b·h for 7B).
* Total per layer: s·b·(16h + 4h_kv + 8i + 4a) with LoRA on every Linear, plus 2r per
  adapted Linear; 41.5·s·b·h bytes for LLaMA-2-7B shapes (h_kv = h, i = 2.69h). A
  one-off check on an H100 (torch 2.11, SDPA, peft LoRA r=16, bf16) kept 41.6·s·b·h per
  layer at b=4, 40.1 at b=1. Without LoRA: s·b·(12h + 4h_kv + 6i) = 32.1·s·b·h (measured
  32.2).
* Full activation checkpointing of every decoder layer (Korthikanti's "full
  recomputation"): 2·s·b·h per layer (its input) plus one layer's saved set while that
  layer is recomputed in backward.
* Always, one layer's backward working set s·b·(2i + 4h)·w/2, the final norm's fp32
  input and the embedding output s·b·(4h + 2h), and the boolean attention mask b·s².
* Logits: the loss runs the LM head at label positions only (``causal_lm_loss``), so no
  [b, s, V] fp32 tensor exists. With n = label_fraction x text tokens x b label
  positions, the head output (w), its fp32 upcast (4) and the log-softmax output kept
  for backward (4) cost n·V·(w + 4 + 4) at the end of forward.
* Projector (trainable, per image of P patches, Q perceiver queries, vision width d_v):
  mlp P·(d_v + 2h)·w; baseline P·(d_v + h)·w; vit P·(14d_v + 2h)·w; perceiver
  (P·(d_v + 6h) + Q·6h)·w. These follow the same "saved inputs" rule, approximately.
* Frozen vision encoder under no_grad: transient only. With ``output_hidden_states``
  every layer's output lives until the tower returns: (L_v + 1)·T·d_v·w per image (T
  tokens, CLS included), plus one layer's working set T·(5d_v + 2i_v)·w. With vision
  LoRA its layers store T·(14d_v + 4i_v + 12r)·w/2 each (2T·d_v·w with checkpointing).

Peak = model states + buffers + max(activations + logits, vision transient, optimizer
step transient): the vision tower runs before the LM's activations pile up, and the
step runs after they are freed.

DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs_all_live`` and
``estimate_zero3_model_states_mem_needs_all_live``, which print
``estimate_zero{2,3}_model_states_mem_needs``) are reported beside ours by
:func:`deepspeed_estimate`. They treat every parameter of the model handed to the
engine as trainable (2Ψ + 18Ψ/N at ZeRO-2: 16-bit weights, 16-bit and fp32 gradients,
fp32 master and moments), add 4x the largest layer at ZeRO-3, and count no activations
and nothing outside the engine (our replicated vision encoder). For a frozen-heavy
model they overstate model states by an order of magnitude and still miss the
activations, which dominate at long sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, fields, replace

from mmtrain.args import ConfigError, ModelArguments

OFFLOADS = ("none", "optimizer", "optimizer+params")
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}
GiB = 2**30

# Configurations from least to most communication and host traffic; :func:`recommend`
# walks this ladder and takes the first that fits (without checkpointing if possible).
SPEED_ORDER: tuple[tuple[int, str], ...] = (
    (0, "none"),
    (1, "none"),
    (2, "none"),
    (2, "optimizer"),
    (3, "none"),
    (3, "optimizer"),
    (3, "optimizer+params"),
)

_LORA_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    @property
    def name(self) -> str:
        off = {"none": "", "optimizer": "+off-opt", "optimizer+params": "+off-opt+par"}[self.offload]
        return f"zero{self.zero_stage}{off}" + ("+ckpt" if self.gradient_checkpointing else "")


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
    projector: str
    image_tokens: int  # LM positions of one image's features
    patches: int  # vision features fed to the projector
    perceiver_queries: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int  # layers actually run (after the read-out layer)
    vision_tokens: int  # tokens inside the tower (CLS included)
    vision_trainable: bool
    vision_lora_rank: int
    image_size: int

    def total(self, trainable: bool | None = None, engine: bool | None = None) -> int:
        return sum(
            n for n, t, e in self.params if (trainable is None or t == trainable) and (engine is None or e == engine)
        )

    def persistent(self, threshold: int, trainable: bool) -> int:
        """Engine parameters small enough to stay whole at stage 3."""
        return sum(n for n, t, e in self.params if e and t == trainable and n < threshold)


def _key(model_args: ModelArguments) -> tuple:
    return tuple(sorted(asdict(model_args).items()))


_FACTS_CACHE: dict[tuple, ModelFacts] = {}


def model_facts(model_args: ModelArguments) -> ModelFacts:
    """Counts and shapes of ``model_args``'s model, from a meta-device build (cached)."""
    key = _key(model_args)
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    from mmtrain.model.builder import build_model, count_parameters, named_parameters_all, numel

    built = build_model(model_args, meta=True)
    model = built.model
    params = tuple(
        (numel(p), bool(p.requires_grad), model.vision_trainable or not name.startswith("vision_encoder."))
        for name, p in named_parameters_all(model)
    )
    largest = max(sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    counts = {c.name: {"total": c.total, "trainable": c.trainable} for c in count_parameters(model)}

    lm_config = model.language_model.config
    hidden = lm_config.hidden_size
    heads = lm_config.num_attention_heads
    head_dim = getattr(lm_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(lm_config, "num_key_value_heads", None) or heads
    layers = lm_config.num_hidden_layers
    targets = built.lora_targets.get("language_model", [])
    per_kind = {k: sum(1 for t in targets if t.rsplit(".", 1)[-1] == k) / layers for k in _LORA_KINDS}

    vision = model.vision
    vconfig = vision.tower.config
    has_cls = type(vconfig).__name__.startswith("CLIP")
    grid = (vconfig.image_size // vconfig.patch_size) ** 2
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
        projector=model_args.vis_proj,
        image_tokens=built.image_tokens.per_image,
        patches=vision.num_patches,
        perceiver_queries=getattr(projector, "num_tokens", 0),
        vision_hidden=vconfig.hidden_size,
        vision_intermediate=vconfig.intermediate_size,
        vision_layers=vconfig.num_hidden_layers,
        vision_tokens=grid + (1 if has_cls else 0),
        vision_trainable=model.vision_trainable,
        vision_lora_rank=model_args.vis_lora_dim,
        image_size=vconfig.image_size,
    )
    _FACTS_CACHE[key] = facts
    return facts


@dataclass
class MemoryEstimate:
    """Bytes per GPU (and per rank in host memory) for one setup; ``total`` is the predicted peak."""

    setup: MemorySetup
    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    buffers: int  # reduce buckets, stage-3 gathered parameters
    activations: int  # kept for backward, plus one layer's recompute and working set
    logits: int
    vision_transient: int  # frozen encoder under no_grad (before the LM runs)
    step_transient: int  # fp32 gradients at the optimizer step (after activations are freed)
    cpu_weights: int = 0
    cpu_gradients: int = 0
    cpu_optimizer_states: int = 0
    deepspeed_model_states: int | None = None  # DeepSpeed's estimator, GPU bytes

    @property
    def model_states(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_states

    @property
    def static(self) -> int:
        return self.model_states + self.buffers

    @property
    def total(self) -> int:
        return self.static + max(self.activations + self.logits, self.vision_transient, self.step_transient)

    @property
    def cpu_total(self) -> int:
        return self.cpu_weights + self.cpu_gradients + self.cpu_optimizer_states

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "setup"}
        d.update(setup=asdict(self.setup), name=self.setup.name, model_states=self.model_states, total=self.total, cpu_total=self.cpu_total)
        return d


def _text_tokens(facts: ModelFacts, setup: MemorySetup) -> int:
    return max(setup.seq_len - setup.images_per_sample * (facts.image_tokens + 2), 0)


def lm_layer_activation_bytes(facts: ModelFacts, tokens: int, w: int) -> int:
    """Bytes one decoder layer keeps for backward over ``tokens`` positions (no checkpointing)."""
    h, hkv, i, r, a = facts.hidden, facts.kv_dim, facts.intermediate, facts.lora_rank, facts.heads
    lora = facts.lora_per_layer
    half = w / 2  # the counts below are in 16-bit bytes; fp32 doubles them
    norm_inputs = 2 * 4 * h  # RMSNorm keeps its input in fp32, whatever the compute dtype
    sdpa = (2 * h + 4 * hkv + 2 * h) * half + 4 * a
    mlp = 6 * i * half
    attn_in = 2 * h * half * max(lora["q_proj"], lora["k_proj"], lora["v_proj"])
    mlp_in = 2 * h * half * max(lora["gate_proj"], lora["up_proj"])
    down_in = 2 * i * half * lora["down_proj"]
    lora_mid = 2 * r * half * (facts.lora_linears / facts.layers)
    dropout = 0.0
    if facts.lora_dropout > 0:
        # Each adapter drops out its own copy of the input: the copy (kept by LoRA A) and a bool mask.
        widths = {k: (i if k == "down_proj" else h) for k in _LORA_KINDS}
        dropout = sum(lora[k] * widths[k] * (2 * half + 1) for k in _LORA_KINDS)
    return int(tokens * (norm_inputs + sdpa + mlp + attn_in + mlp_in + down_in + lora_mid + dropout))


def _projector_activation_bytes(facts: ModelFacts, images: int, w: int) -> int:
    p, dv, h, q = facts.patches, facts.vision_hidden, facts.hidden, facts.perceiver_queries
    per_image = {
        "mlp": p * (dv + 2 * h),
        "baseline": p * (dv + h),
        "vit": p * (14 * dv + 2 * h),
        "perceiver": p * (dv + 6 * h) + q * 6 * h,
    }[facts.projector]
    return images * per_image * w


def _vision_transient_bytes(facts: ModelFacts, images: int, w: int) -> int:
    t, dv, iv = facts.vision_tokens, facts.vision_hidden, facts.vision_intermediate
    hidden_states = (facts.vision_layers + 1) * t * dv * w
    layer = t * (5 * dv + 2 * iv) * w
    pixels = 3 * facts.image_size**2 * w
    return images * (hidden_states + layer + pixels)


def _vision_trained_activation_bytes(facts: ModelFacts, images: int, w: int, checkpointing: bool) -> int:
    t, dv, iv, r = facts.vision_tokens, facts.vision_hidden, facts.vision_intermediate, facts.vision_lora_rank
    layer = int(t * (14 * dv + 4 * iv + 12 * r) * w / 2)
    if checkpointing:
        return images * (facts.vision_layers * 2 * t * dv * w // 2 + layer)
    return images * facts.vision_layers * layer


def stage3_gathered_parameters(facts: ModelFacts, setup: MemorySetup) -> int:
    """Elements of partitioned parameters gathered whole on one GPU at once at stage 3.

    ``min(Ψ_p, max(m, M + p))``: the prefetcher fills up to ``max_live_parameters`` (M)
    and overshoots by at most one parameter (p, the largest); the running module (m) is
    gathered whatever the limit. See the module docstring for DeepSpeed's logic.
    """
    partitioned = [n for n, _, e in facts.params if e and n >= setup.param_persistence_threshold]
    if not partitioned:
        return 0
    live = facts.largest_module
    if setup.prefetch_bucket_size > 0:
        live = max(live, setup.max_live_parameters + max(partitioned))
    return min(sum(partitioned), live)


def estimate(model: ModelArguments | ModelFacts, setup: MemorySetup) -> MemoryEstimate:
    """Predicted peak allocated bytes of one GPU for ``setup`` (see the module docstring)."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    n, stage, offload, w = setup.num_gpus, setup.zero_stage, setup.offload, PRECISIONS[setup.precision]
    opt_bytes = 8 if setup.precision == "fp32" else 12
    psi_t = facts.total(trainable=True, engine=True)
    psi_f = facts.total(trainable=False, engine=True)
    psi_v = facts.total(engine=False)

    # Weights: the outside vision encoder is always whole; engine weights split at stage 3.
    if stage < 3:
        frozen, trainable, cpu_weights = w * (psi_v + psi_f), w * psi_t, 0
    else:
        keep_f = facts.persistent(setup.param_persistence_threshold, trainable=False)
        keep_t = facts.persistent(setup.param_persistence_threshold, trainable=True)
        part_f, part_t = w * (psi_f - keep_f) // n, w * (psi_t - keep_t) // n
        if offload == "optimizer+params":
            frozen, trainable, cpu_weights = w * (psi_v + keep_f), w * keep_t, part_f + part_t
        else:
            frozen, trainable, cpu_weights = w * (psi_v + keep_f) + part_f, w * keep_t + part_t, 0

    # Gradients and optimizer states of trainable parameters only.
    shard = psi_t if stage == 0 else math.ceil(psi_t / n)
    grads = w * (psi_t if stage < 2 else math.ceil(psi_t / n))
    optimizer, cpu_grads, cpu_opt = opt_bytes * shard, 0, 0
    step = 0 if setup.precision == "fp32" else 4 * shard
    if offload != "none":
        cpu_opt, cpu_grads = optimizer, 4 * shard
        optimizer, step = 0, 0
        if stage >= 2:
            grads = 0  # reduced through the buckets straight into the host partition

    buffers = 0
    if stage == 0 and n > 1:
        buffers = w * min(psi_t, setup.reduce_bucket_size)
    elif stage > 0 and psi_t:
        buffers = w * setup.reduce_bucket_size
    if stage == 3:
        buffers += w * stage3_gathered_parameters(facts, setup)

    # Activations of one micro-batch.
    b, s = setup.micro_batch, setup.seq_len
    tokens = b * s
    images = b * setup.images_per_sample
    h, i = facts.hidden, facts.intermediate
    layer = lm_layer_activation_bytes(facts, tokens, w)
    if setup.gradient_checkpointing:
        lm = facts.layers * tokens * h * w + layer
    else:
        lm = facts.layers * layer
    working = int(tokens * (2 * i + 4 * h) * w / 2)
    extras = tokens * (4 * h + h * w) + b * s * s
    acts = lm + working + extras + _projector_activation_bytes(facts, images, w)
    if facts.vision_trainable:
        acts += _vision_trained_activation_bytes(facts, images, w, setup.gradient_checkpointing)
        vision_transient = 0
    else:
        vision_transient = _vision_transient_bytes(facts, images, w)
    labels = int(setup.label_fraction * _text_tokens(facts, setup)) * b
    logits = labels * facts.vocab * (w + 4 + 4 if w == 2 else 8)

    est = MemoryEstimate(
        setup=setup,
        frozen_weights=int(frozen),
        trainable_weights=int(trainable),
        gradients=int(grads),
        optimizer_states=int(optimizer),
        buffers=int(buffers),
        activations=int(acts),
        logits=int(logits),
        vision_transient=int(vision_transient),
        step_transient=int(step),
        cpu_weights=int(cpu_weights),
        cpu_gradients=int(cpu_grads),
        cpu_optimizer_states=int(cpu_opt),
    )
    est.deepspeed_model_states = deepspeed_estimate(facts, setup)
    return est


def deepspeed_estimate(facts: ModelFacts, setup: MemorySetup) -> int | None:
    """GPU bytes DeepSpeed's own model-state estimator gives for ``setup`` (None at stage 0).

    Fed what ``estimate_zero{2,3}_model_states_mem_needs_all_live`` would read from the
    model handed to the engine: its parameter count (all taken as trainable; the frozen
    vision encoder outside the engine is not seen) and its largest layer.
    """
    if setup.zero_stage == 0:
        return None
    total = facts.total(engine=True)
    per_node = min(setup.num_gpus, 8)
    nodes = math.ceil(setup.num_gpus / per_node)
    if setup.zero_stage < 3:
        with _quiet_import():
            from mmtrain.compat import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=setup.offload != "none"
        )
        return int(gpu)
    with _quiet_import():
        from mmtrain.compat import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total,
        facts.largest_module,
        num_gpus_per_node=per_node,
        num_nodes=nodes,
        cpu_offload=setup.offload != "none",
        cpu_offload_params=setup.offload == "optimizer+params",
    )
    return int(gpu)


def _quiet_import():
    # DeepSpeed announces its accelerator on stdout at import, which would corrupt --json.
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def all_setups(base: MemorySetup) -> list[MemorySetup]:
    """``base`` at every rung of :data:`SPEED_ORDER`."""
    return [replace(base, zero_stage=st, offload=off) for st, off in SPEED_ORDER]


@dataclass
class Recommendation:
    estimate: MemoryEstimate | None
    budget: int  # bytes an estimate's total may reach
    reason: str


def recommend(
    model: ModelArguments | ModelFacts,
    base: MemorySetup,
    gpu_memory: int,
    *,
    reserved: int = GiB,
    margin: float = 0.05,
) -> Recommendation:
    """The fastest setup that fits ``gpu_memory`` bytes.

    Walks :data:`SPEED_ORDER`; at each rung takes the setup without gradient
    checkpointing if it fits, else with it. ``reserved`` (CUDA context, NCCL) and
    ``margin`` (allocator fragmentation) come off the memory first, since the estimate
    is of peak *allocated* memory.
    """
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    budget = int(gpu_memory * (1 - margin)) - reserved
    for setup in all_setups(base):
        for ckpt in (False, True):
            est = estimate(facts, replace(setup, gradient_checkpointing=ckpt))
            if est.total <= budget:
                why = "fits without checkpointing" if not ckpt else "fits only with gradient checkpointing"
                return Recommendation(est, budget, f"{est.setup.name}: {why} ({_gib(est.total)} of {_gib(budget)} usable)")
    return Recommendation(None, budget, f"nothing fits in {_gib(budget)} usable: lower the micro-batch or the sequence length, or add GPUs")


# --------------------------------------------------------------------------------------
# Measurements: benchmarks/results/memory_h100.json
# --------------------------------------------------------------------------------------

MEASUREMENT_FIELDS = {
    "stage": int,  # ZeRO stage 0-3
    "offload": str,  # none | optimizer | optimizer+params
    "micro_batch": int,
    "seq_len": int,
    "gradient_checkpointing": bool,
    "num_gpus": int,
    "measured_peak_bytes": int,  # torch.cuda.max_memory_allocated over the measured steps
    "predicted_peak_bytes": int,  # estimate(...).total when measured
    "device": str,  # torch.cuda.get_device_name()
    "versions": dict,  # {"torch": ..., "transformers": ..., "deepspeed": ..., "mmtrain": ...}
    "command": str,  # the exact command that produced the row
}
"""The measurement file is a JSON list of objects with exactly these keys (extra keys are
allowed and kept, e.g. ``workload``, ``precision``, ``images_per_sample``, ``notes``)."""

MEASUREMENTS_PATH = "benchmarks/results/memory_h100.json"


def ref_model_args(workload: str = "ref-7b") -> ModelArguments:
    """The model of a reference workload (see the project's workload definitions)."""
    if workload == "ref-7b":
        return ModelArguments(
            lm_model_name_or_path="llama-2-7b",
            vision_model_name_or_path="clip-vit-large-patch14-336",
            vis_proj="mlp",
            lang_lora_dim=16,
        )
    if workload == "ref-13b":
        return ModelArguments(
            lm_model_name_or_path="llama-2-13b",
            vision_model_name_or_path="clip-vit-bigG-14",
            vis_proj="perceiver",
            lang_lora_dim=16,
        )
    raise ConfigError(f"unknown workload {workload!r}; known: ref-7b, ref-13b")


def validation_rows() -> list[MemorySetup]:
    """The ref-7b setups to measure on one H100, in this order (16 runs, 2048 tokens, bf16)."""
    rows = []
    for stage, offload in ((0, "none"), (2, "none"), (2, "optimizer"), (3, "optimizer+params")):
        for micro_batch in (1, 4):
            for ckpt in (False, True):
                rows.append(
                    MemorySetup(
                        zero_stage=stage,
                        offload=offload,
                        num_gpus=1,
                        micro_batch=micro_batch,
                        seq_len=2048,
                        precision="bf16",
                        gradient_checkpointing=ckpt,
                    )
                )
    return rows


def setup_from_row(row: dict) -> MemorySetup:
    """The :class:`MemorySetup` a measurement row describes."""
    extra = {k: row[k] for k in ("precision", "images_per_sample", "label_fraction") if k in row}
    return MemorySetup(
        zero_stage=row["stage"],
        offload=row["offload"],
        num_gpus=row["num_gpus"],
        micro_batch=row["micro_batch"],
        seq_len=row["seq_len"],
        gradient_checkpointing=row["gradient_checkpointing"],
        **extra,
    )


def load_measurements(path: str = MEASUREMENTS_PATH) -> list[dict]:
    """Read and check a measurement file (schema: :data:`MEASUREMENT_FIELDS`)."""
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    for k, row in enumerate(rows):
        missing = [key for key in MEASUREMENT_FIELDS if key not in row]
        if missing:
            raise ValueError(f"{path}: row {k} lacks {', '.join(missing)}")
        for key, kind in MEASUREMENT_FIELDS.items():
            ok = isinstance(row[key], kind) and not (kind is int and isinstance(row[key], bool))
            if not ok:
                raise ValueError(f"{path}: row {k} field {key!r} should be {kind.__name__}, got {row[key]!r}")
        if row["offload"] not in OFFLOADS:
            raise ValueError(f"{path}: row {k} offload {row['offload']!r} is not one of {', '.join(OFFLOADS)}")
    return rows


def compare(rows: list[dict], tolerance: float = 0.10) -> list[dict]:
    """Each row with ``ratio`` = measured / predicted and ``within`` = |ratio - 1| <= tolerance."""
    out = []
    for row in rows:
        ratio = row["measured_peak_bytes"] / max(row["predicted_peak_bytes"], 1)
        out.append({**row, "ratio": ratio, "within": abs(ratio - 1) <= tolerance})
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``24G``, ``40960MiB`` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 24GB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1024 if binary or not text.strip().upper().endswith("B") else 1000
    return int(value * base**power)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


_ROWS = (
    ("frozen weights", "frozen_weights"),
    ("trainable weights", "trainable_weights"),
    ("gradients", "gradients"),
    ("optimizer states", "optimizer_states"),
    ("buffers", "buffers"),
    ("activations", "activations"),
    ("logits", "logits"),
    ("vision transient", "vision_transient"),
    ("step transient", "step_transient"),
    ("peak allocated", "total"),
    ("host: weights", "cpu_weights"),
    ("host: gradients", "cpu_gradients"),
    ("host: optimizer", "cpu_optimizer_states"),
    ("DeepSpeed estimator", "deepspeed_model_states"),
)


def format_table(estimates: list[MemoryEstimate]) -> str:
    width = max(15, *(len(e.setup.name) + 2 for e in estimates))
    lines = [f"{'GiB per GPU':<20}" + "".join(f"{e.setup.name:>{width}}" for e in estimates)]
    lines.append("-" * len(lines[0]))
    for label, attr in _ROWS:
        if attr == "total" or attr == "cpu_weights":
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<20}" + "".join(f"{_gib(getattr(e, attr)):>{width}}" for e in estimates))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--num_gpus", type=int, default=1)
    extra.add_argument("--micro_batch", type=int, default=1)
    extra.add_argument("--seq_len", type=int, default=2048)
    extra.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    extra.add_argument("--gradient_checkpointing", action="store_true")
    extra.add_argument("--images_per_sample", type=int, default=1)
    extra.add_argument("--label_fraction", type=float, default=0.25)
    extra.add_argument("--gpu_memory", default="80GiB", help="memory of one GPU, e.g. 24GiB, 40GB, 80GiB")
    extra.add_argument("--json", action="store_true", help="print JSON instead of a table")
    opts, rest = extra.parse_known_args(argv)
    parser = HfArgumentParser(ModelArguments, description=__doc__.splitlines()[0])
    try:
        model_args, leftover = parser.parse_args_into_dataclasses(rest, return_remaining_strings=True)
        if leftover:
            raise ConfigError(f"unknown flags: {' '.join(leftover)}")
        base = MemorySetup(
            num_gpus=opts.num_gpus,
            micro_batch=opts.micro_batch,
            seq_len=opts.seq_len,
            precision=opts.precision,
            gradient_checkpointing=opts.gradient_checkpointing,
            images_per_sample=opts.images_per_sample,
            label_fraction=opts.label_fraction,
        )
        gpu_memory = parse_bytes(opts.gpu_memory)
        facts = model_facts(model_args)
        estimates = [estimate(facts, s) for s in all_setups(base)]
        rec = recommend(facts, base, gpu_memory)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.json:
        print(
            json.dumps(
                {
                    "gpu_memory": gpu_memory,
                    "estimates": [e.as_dict() for e in estimates],
                    "recommendation": {
                        "setup": asdict(rec.estimate.setup) if rec.estimate else None,
                        "name": rec.estimate.setup.name if rec.estimate else None,
                        "total": rec.estimate.total if rec.estimate else None,
                        "budget": rec.budget,
                        "reason": rec.reason,
                    },
                },
                indent=2,
            )
        )
    else:
        trainable = facts.total(trainable=True)
        print(f"{facts.total():,} parameters, {trainable:,} trainable; {base.num_gpus} GPU(s), micro-batch {base.micro_batch} x {base.seq_len} tokens, {base.precision}")
        print(format_table(estimates))
        print(f"recommended for {_gib(gpu_memory)} GiB GPUs: {rec.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
