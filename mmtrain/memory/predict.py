"""Predicted peak allocated bytes of one GPU, term by term, and the fastest setup that fits.

Every count here is derived, with its sources, in the package docstring
(``mmtrain/memory/__init__.py``).
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass, fields, replace

from mmtrain.model.nf4 import BITS_PER_WEIGHT
from mmtrain.memory.facts import GiB, LORA_KINDS, PRECISIONS, MemorySetup, ModelFacts, in_gib, model_facts
from mmtrain.model.config import VLMConfig

# Configurations from least to most communication and host traffic; :func:`recommend`
# walks this ladder and takes the first that fits (without checkpointing if possible).
SPEED_ORDER: tuple[tuple[int, str], ...] = (
    (0, "none"), (1, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "optimizer+params"),
)


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
    reference_transient: int = 0  # --precompute_ref: the reference's starting copies while its table is made
    cpu_weights: int = 0
    cpu_gradients: int = 0
    cpu_optimizer_states: int = 0
    deepspeed_model_states: int | None = None  # DeepSpeed's estimator, GPU bytes
    # A checkpoint: host memory one save adds to a rank at most (beyond what it held
    # before), and the bytes one checkpoint folder takes on disk (all ranks' files).
    checkpoint_host: int = 0
    checkpoint_disk: int = 0

    @property
    def model_states(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_states

    @property
    def static(self) -> int:
        return self.model_states + self.buffers

    @property
    def total(self) -> int:
        return self.static + max(self.activations + self.logits, self.vision_transient, self.step_transient, self.reference_transient)

    @property
    def cpu_total(self) -> int:
        return self.cpu_weights + self.cpu_gradients + self.cpu_optimizer_states

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "setup"}
        d.update(setup=asdict(self.setup), name=self.setup.name, model_states=self.model_states, total=self.total, cpu_total=self.cpu_total)
        return d


def _text_tokens(facts: ModelFacts, setup: MemorySetup) -> int:
    return max(setup.seq_len - setup.images_per_sample * (facts.image_tokens + 2), 0)


def lm_layer_activation_bytes(facts: ModelFacts, tokens: int, w: int, compiled: bool = False, trained: bool = False) -> int:
    """Bytes one decoder layer keeps for backward over ``tokens`` positions (no checkpointing).

    ``compiled``: the layer runs compiled, which keeps each norm's input in the compute
    dtype and recomputes the SiLU output (the package docstring). ``trained``: the
    layer's own weights train, so every Linear keeps its input for its weight gradient,
    as a LoRA-adapted one does (without LoRA's rank-r intermediates).
    """
    h, hkv, i, r, a = facts.hidden, facts.kv_dim, facts.intermediate, facts.lora_rank, facts.heads
    lora = facts.lora_per_layer
    if trained:
        lora = {k: 1.0 for k in LORA_KINDS}
    half = w / 2  # the counts below are in 16-bit bytes; fp32 doubles them
    if compiled:
        norm_inputs = 2 * max(w, 2) * h  # kept in the compute dtype, the fp32 upcast recomputed
        mlp = 4 * i * half  # gate and up; SiLU recomputed from the gate
    else:
        norm_inputs = 2 * 4 * h  # RMSNorm keeps its input in fp32, whatever the compute dtype
        mlp = 6 * i * half
    sdpa = (2 * h + 4 * hkv + 2 * h) * half + 4 * a
    attn_in = 2 * h * half * max(lora["q_proj"], lora["k_proj"], lora["v_proj"])
    mlp_in = 2 * h * half * max(lora["gate_proj"], lora["up_proj"])
    down_in = 2 * i * half * lora["down_proj"]
    lora_mid = 0.0 if trained else 2 * r * half * (facts.lora_linears / facts.layers)
    dropout = 0.0
    if facts.lora_dropout > 0 and not trained:
        # Each adapter drops out its own copy of the input: the copy (kept by LoRA A) and a bool mask.
        widths = {k: (i if k == "down_proj" else h) for k in LORA_KINDS}
        dropout = sum(lora[k] * widths[k] * (2 * half + 1) for k in LORA_KINDS)
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
    """The frozen towers under no_grad; fused towers run one after the other, the first's features kept."""
    peak, kept = 0, 0
    for tower in facts.vision_towers:
        t, dv, iv = tower.tokens, tower.hidden, tower.intermediate
        hidden_states = (tower.layers + 1) * t * dv * w
        layer = t * (5 * dv + 2 * iv) * w
        peak = max(peak, kept + images * (hidden_states + layer + tower.pixels * w))
        kept += images * tower.features * w
    return peak


def _vision_trained_activation_bytes(facts: ModelFacts, images: int, w: int, checkpointing: bool) -> int:
    total, r = 0, facts.vision_lora_rank
    for tower in facts.vision_towers:
        t, dv, iv = tower.tokens, tower.hidden, tower.intermediate
        layer = int(t * (14 * dv + 4 * iv + 12 * r) * w / 2)
        if checkpointing:
            total += images * (tower.layers * 2 * t * dv * w // 2 + layer)
        else:
            total += images * tower.layers * layer
    return total


def stage3_gathered_parameters(facts: ModelFacts, setup: MemorySetup) -> int:
    """Elements of partitioned parameters gathered whole on one GPU at once at stage 3.

    ``min(Ψ_p, max(m, M + p))``: the prefetcher fills up to ``max_live_parameters`` (M)
    and overshoots by at most one parameter (p, the largest); the running module (m) is
    gathered whatever the limit. See the package docstring for DeepSpeed's logic.
    """
    partitioned = [n for n, _, e in facts.params if e and n >= setup.param_persistence_threshold]
    if not partitioned:
        return 0
    live = facts.largest_module
    if setup.prefetch_bucket_size > 0:
        live = max(live, setup.max_live_parameters + max(partitioned))
    return min(sum(partitioned), live)


def estimate(model: VLMConfig | ModelFacts, setup: MemorySetup) -> MemoryEstimate:
    """Predicted peak allocated bytes of one GPU for ``setup`` (see the package docstring)."""
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    n, stage, offload, w = setup.num_gpus, setup.zero_stage, setup.offload, PRECISIONS[setup.precision]
    opt_bytes = 8 if setup.precision == "fp32" else 12
    psi_t = facts.total(trainable=True, engine=True)
    psi_f = facts.total(trainable=False, engine=True)
    psi_v = facts.total(engine=False)

    # Weights: the outside vision encoder is always whole; engine weights split at stage 3.
    if stage < 3:
        frozen, trainable, cpu_weights = w * (psi_v + psi_f), w * psi_t, 0
        # float8 frozen Linears: one byte a weight plus an fp32 scale per output channel on the
        # GPU; the main process keeps the originals in host memory for exports.
        for on, weights, scales in (
            (setup.fp8_base, facts.fp8_base_weights, facts.fp8_base_scales),
            (setup.fp8_vision, facts.fp8_vision_weights, facts.fp8_vision_scales),
        ):
            if on:
                frozen += weights + 4 * scales - w * weights
                cpu_weights += w * weights
        # NF4 frozen Linears: 4.127 bits a weight, block scales included (mmtrain/model/nf4.py);
        # no originals are kept. Each product dequantises one weight to w bytes and frees it.
        for on, weights in ((setup.nf4_base, facts.nf4_base_weights), (setup.nf4_vision, facts.nf4_vision_weights)):
            if on:
                frozen += math.ceil(weights * BITS_PER_WEIGHT / 8) - w * weights
        if setup.nf4_base or setup.nf4_vision:
            frozen += w * facts.nf4_largest
    else:
        keep_f = facts.persistent(setup.param_persistence_threshold, trainable=False)
        keep_t = facts.persistent(setup.param_persistence_threshold, trainable=True)
        part_f, part_t = w * (psi_f - keep_f) // n, w * (psi_t - keep_t) // n
        if offload == "optimizer+params":
            frozen, trainable, cpu_weights = w * (psi_v + keep_f), w * keep_t, part_f + part_t
        else:
            frozen, trainable, cpu_weights = w * (psi_v + keep_f) + part_f, w * keep_t + part_t, 0

    reference = 0
    if setup.preference_pairs:
        # DPO's reference (mmtrain/training/reference.py): the starting values of every trained
        # tensor but fresh LoRA, whole on every rank (at ZeRO-3 each rank's share, on the host
        # with parameter offload); with the whole LM trained, a frozen copy of it.
        lora = sum(facts.counts.get(part, {}).get("trainable", 0) for part in ("LM LoRA", "vision LoRA"))
        copied = max(psi_t - lora, 0)
        reference = w * (copied if stage < 3 else math.ceil(copied / n))
        if stage == 3 and offload == "optimizer+params":
            cpu_weights, reference = cpu_weights + reference, 0
    if not setup.precompute_ref:
        frozen, reference = frozen + reference, 0

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
    rows = 2 if setup.preference_pairs else 1  # a pair is its chosen and its rejected row
    b, s = setup.micro_batch * rows, setup.seq_len
    # Sequence parallelism: the LM holds 1/sp of each row's positions on each GPU (attention
    # holds all positions for 1/sp of the heads: the same bytes); images and projector are the whole row's.
    sp = setup.sequence_parallel
    shared = setup.preference_pairs and setup.shared_prompt  # each pair one row: its prompt once, then both answers
    tokens = setup.micro_batch * (s + int(setup.label_fraction * _text_tokens(facts, setup))) if shared else math.ceil(b * s / sp)
    # a pair's images are encoded once; each image is its tiles with AnyRes
    images = setup.micro_batch * setup.images_per_sample * facts.tiles_per_image
    h, i = facts.hidden, facts.intermediate
    layer = lm_layer_activation_bytes(facts, tokens, w, compiled=setup.compiled)
    trained_layer = lm_layer_activation_bytes(facts, tokens, w, compiled=setup.compiled, trained=True)
    n_trained = facts.lm_trained_layers
    if setup.gradient_checkpointing:
        lm = facts.layers * tokens * h * w + (trained_layer if n_trained else layer)
    else:
        lm = (facts.layers - n_trained) * layer + n_trained * trained_layer
    working = int(tokens * (2 * i + 4 * h) * w / 2)
    extras = tokens * (4 * h + h * w) + (b * s * s if sp == 1 else 0)  # split rows' attention takes no mask
    acts = lm + working + extras + _projector_activation_bytes(facts, images, w)
    if facts.vision_trainable:
        acts += _vision_trained_activation_bytes(facts, images, w, setup.gradient_checkpointing)
        vision_transient = 0
    else:
        vision_transient = _vision_transient_bytes(facts, images, w)
    labels = math.ceil(int(setup.label_fraction * _text_tokens(facts, setup)) * b / sp)
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
        # --precompute_ref: the copies beside one no-grad forward's working set and logits, before the first step
        reference_transient=int(reference + working + logits) if reference else 0,
        cpu_weights=int(cpu_weights),
        cpu_gradients=int(cpu_grads),
        cpu_optimizer_states=int(cpu_opt),
    )
    est.checkpoint_host, est.checkpoint_disk = checkpoint_cost(facts, setup)
    est.deepspeed_model_states = deepspeed_estimate(facts, setup)
    return est


def checkpoint_cost(facts: ModelFacts, setup: MemorySetup) -> tuple[int, int]:
    """``(host bytes one save adds to a rank at most, bytes of one checkpoint on disk)`` (package docstring)."""
    psi = facts.total(trainable=True)
    largest = max((n for n, trainable, _ in facts.params if trainable), default=0)
    w = PRECISIONS[setup.precision]
    opt_bytes = 8 if setup.precision == "fp32" else 12
    # The portable state: the main rank holds one fp32 tensor at a time.
    portable = 4 * largest
    # The engine's own files, written storage by storage: a flat fp32 partition of one
    # parameter group is the largest copied from the device; offloaded ones are on the host already.
    engine = 0 if setup.offload != "none" else 4 * math.ceil(psi / setup.num_gpus)
    return max(portable, engine), (12 + w + opt_bytes) * psi


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
            from mmtrain.compat.deepspeed import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=setup.offload != "none"
        )
        return int(gpu)
    with _quiet_import():
        from mmtrain.compat.deepspeed import estimate_zero3_model_states_mem_needs

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
    return contextlib.redirect_stdout(io.StringIO())


def all_setups(base: MemorySetup) -> list[MemorySetup]:
    """``base`` at every rung of :data:`SPEED_ORDER` (the ZeRO-3 rungs without float8 and NF4, which training refuses there)."""
    return [
        replace(base, zero_stage=st, offload=off, **({"fp8_base": False, "fp8_vision": False, "nf4_base": False, "nf4_vision": False} if st == 3 else {}))
        for st, off in SPEED_ORDER
    ]


@dataclass
class Recommendation:
    estimate: MemoryEstimate | None
    budget: int  # bytes an estimate's total may reach
    reason: str


def recommend(
    model: VLMConfig | ModelFacts,
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
                return Recommendation(est, budget, f"{est.setup.name}: {why} ({in_gib(est.total)} of {in_gib(budget)} usable)")
    return Recommendation(None, budget, f"nothing fits in {in_gib(budget)} usable: lower the micro-batch or the sequence length, or add GPUs")


def fit_warning(model: VLMConfig | ModelFacts, setup: MemorySetup, gpu_memory: int, *, reserved: int = GiB, margin: float = 0.05) -> str | None:
    """A warning when ``setup`` is predicted not to fit ``gpu_memory``, naming the estimate and what would fit; else None.

    What would fit: every rung of :data:`SPEED_ORDER` at this GPU count, with and without
    gradient checkpointing, whose estimate is within the usable memory (as :func:`recommend`).
    """
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    budget = int(gpu_memory * (1 - margin)) - reserved
    est = estimate(facts, setup)
    if est.total <= budget:
        return None
    fitting = []
    for candidate in all_setups(setup):
        for ckpt in (False, True):
            other = estimate(facts, replace(candidate, gradient_checkpointing=ckpt))
            if other.total <= budget:
                fitting.append(f"{other.setup.name} ({in_gib(other.total)} GiB)")
                break
    where = ", ".join(fitting) if fitting else "none at this micro-batch and length: lower them or add GPUs"
    return (
        f"predicted peak {in_gib(est.total)} GiB per GPU for {setup.name} on {setup.num_gpus} GPU(s) "
        f"(micro-batch {setup.micro_batch} x {setup.seq_len} tokens, {facts.total(trainable=True):,} trainable parameters) "
        f"exceeds the {in_gib(budget)} GiB usable of {in_gib(gpu_memory)} GiB (mmtrain.memory); would fit: {where}"
    )
