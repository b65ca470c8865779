"""What fits one GPU, and how fast: every way of holding the frozen base, checkpointing, offload and token budget.

``python -m mmtrain.memory --gpu_memory 24GiB [model flags]`` prints, after the ZeRO
ladder, one row per option: the frozen base in bfloat16, float8 (``--fp8_base``) or NF4
(``--quantize_base nf4``, and with ``--quantize_vision nf4`` the vision tower too); gradient checkpointing off or on; no offload (ZeRO-0),
optimizer offload (ZeRO-2) or parameter offload (ZeRO-3, bfloat16 only: float8 and NF4
are refused there); and a token budget (``--max_tokens_per_batch``) of 8192 down to 1024
tokens, holding as many samples of ``--seq_len`` tokens (and their images) as fit. Each row has its predicted peak (:func:`mmtrain.memory.predict.estimate`, the
same model as the ladder's), whether it fits the usable memory, and a predicted speed;
the fastest option that fits is the recommendation, with its command.

The speed model (predicted tokens/s on one H200; another card scales with its bfloat16
throughput, and these are predictions that ``benchmarks/small_gpu.py`` measures):

* bfloat16, no checkpointing: ``R * T / (T + T0)`` tokens/s at a budget of ``T`` tokens,
  with ``R = 22,450`` and ``T0 = 5,083`` fitted to the two measured ref-7b points
  (17,136 tokens/s at 16,384 and 18,604 at 24,576 tokens, benchmarks/README.md,
  "the float8 frozen base"): a small budget pays the step's fixed costs (the optimizer
  step, the vision tower, launches) over fewer tokens. ``R`` is scaled by ref-7b's LM
  Linear weights over the model's (the products' cost grows with them).
* checkpointing recomputes the forward: with a frozen LM a step is a forward and an
  input-gradient backward of the same cost, so one more forward is 6/4 of the time;
  with LM weights that train (three products a layer), 8/6.
* float8: 1.3x (measured 1.27x-1.36x on ref-7b), on GPUs with float8 tensor cores only
  (Ada, Hopper: compute capability >= 8.9): recommended only with ``--float8_gpu``.
* NF4: each product dequantises its weight (read 4.127 bits, write and read back 2
  bytes a weight) in forward, in backward and in checkpointing's recomputation; that
  traffic at 70% of the H200's 4.8 TB/s is added to the step (the vision tower's, with
  ``--quantize_vision``, once: it runs forward only).
* optimizer offload: the trainable weights and gradients cross PCIe each step (4 bytes
  each at 25 GB/s) and the CPU's Adam reads and writes 16 bytes each at 10 GB/s.
* parameter offload: every weight crosses PCIe in bfloat16 once per forward and once
  per backward (and per recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmtrain.memory.facts import GiB, MemorySetup, ModelFacts, in_gib
from mmtrain.memory.predict import MemoryEstimate, estimate
from mmtrain.model.nf4 import BITS_PER_WEIGHT

BASES = ("bf16", "fp8", "nf4", "nf4+vision")  # nf4+vision: --quantize_vision nf4 too (large towers, e.g. ViT-bigG)
TOKEN_BUDGETS = (8192, 4096, 2048, 1024)
# (ZeRO stage, offload, Accelerate config) a single-GPU option runs with.
RUNGS = ((0, "none", "zero0.yaml"), (2, "optimizer", "zero2_offload.yaml"), (3, "optimizer+params", "zero3_offload.yaml"))

# The speed model's constants (module docstring says where each comes from).
H200_TOKENS_PER_S = 22_450  # R: bf16 ref-7b on one H200 as the budget grows without bound
FIXED_COST_TOKENS = 5_083  # T0
REF_7B_LM_LINEAR_WEIGHTS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # LLaMA-2-7B's decoder Linears
FLOAT8_SPEEDUP = 1.3
H200_BANDWIDTH = 0.7 * 4.8e12  # bytes/s a memory-bound kernel reaches
PCIE = 25e9  # bytes/s host <-> GPU
HOST_ADAM = 10e9  # bytes/s of the CPU's Adam (reads and writes 16 bytes a parameter)


@dataclass
class Option:
    base: str  # bf16 | fp8 | nf4
    zero_stage: int
    offload: str
    config_file: str
    gradient_checkpointing: bool
    max_tokens_per_batch: int
    estimate: MemoryEstimate
    fits: bool
    tokens_per_s: float  # predicted, one H200

    @property
    def name(self) -> str:
        off = {"none": "", "optimizer": " +offload opt", "optimizer+params": " +offload opt+params"}[self.offload]
        return f"{self.base} zero{self.zero_stage}{off}" + (" +ckpt" if self.gradient_checkpointing else "") + f" budget {self.max_tokens_per_batch}"


def predicted_tokens_per_s(facts: ModelFacts, setup: MemorySetup, base: str, budget: int) -> float:
    """Tokens/s one H200 is predicted to train ``setup`` at (module docstring: the speed model)."""
    linear_weights = max(facts.nf4_base_weights, 1)
    rate = H200_TOKENS_PER_S * REF_7B_LM_LINEAR_WEIGHTS / linear_weights * budget / (budget + FIXED_COST_TOKENS)
    seconds = budget / rate
    if setup.gradient_checkpointing:
        seconds *= 8 / 6 if facts.lm_trained_layers else 6 / 4
    if base == "fp8":
        seconds /= FLOAT8_SPEEDUP
    passes = 3 if setup.gradient_checkpointing else 2
    if base.startswith("nf4"):
        seconds += passes * facts.nf4_base_weights * (BITS_PER_WEIGHT / 8 + 4) / H200_BANDWIDTH
    if base == "nf4+vision":  # the tower runs forward only, under no_grad
        seconds += facts.nf4_vision_weights * (BITS_PER_WEIGHT / 8 + 4) / H200_BANDWIDTH
    trainable = facts.total(trainable=True)
    if setup.offload != "none":
        seconds += trainable * 8 / PCIE + trainable * 16 / HOST_ADAM
    if setup.offload == "optimizer+params":
        seconds += passes * 2 * facts.total(trainable=False, engine=True) / PCIE
    return budget / seconds


def options(facts: ModelFacts, base: MemorySetup, gpu_memory: int, *, reserved: int = GiB, margin: float = 0.05) -> list[Option]:
    """Every option on one GPU (module docstring), fastest first; ``reserved`` and ``margin`` as :func:`recommend`'s."""
    budget_bytes = int(gpu_memory * (1 - margin)) - reserved
    rows = []
    for weights in BASES:
        for stage, offload, config_file in RUNGS:
            if weights != "bf16" and (stage == 3 or not facts.nf4_base_weights):
                continue  # training refuses float8 and NF4 at ZeRO-3, and where no LM Linear is frozen
            if weights == "nf4+vision" and not facts.nf4_vision_weights:
                continue
            for ckpt in (False, True):
                for tokens in TOKEN_BUDGETS:
                    # A budget row packs whole samples of about --seq_len tokens: their images too.
                    images = max(1, tokens // base.seq_len) * base.images_per_sample
                    setup = replace(
                        base, zero_stage=stage, offload=offload, num_gpus=1, sequence_parallel=1, micro_batch=1, seq_len=tokens, images_per_sample=images,
                        gradient_checkpointing=ckpt, fp8_base=weights == "fp8", nf4_base=weights.startswith("nf4"),
                        fp8_vision=False, nf4_vision=weights == "nf4+vision",
                    )
                    est = estimate(facts, setup)
                    rows.append(Option(weights, stage, offload, config_file, ckpt, tokens, est, est.total <= budget_bytes,
                                       predicted_tokens_per_s(facts, setup, weights, tokens)))
    rows.sort(key=lambda o: -o.tokens_per_s)
    return rows


def best(rows: list[Option], *, float8_gpu: bool = False) -> Option | None:
    """The fastest option that fits (float8 only where the GPU has float8 tensor cores)."""
    return next((o for o in rows if o.fits and (float8_gpu or o.base != "fp8")), None)


def model_flags(model_args) -> list[str]:
    """The model flags of ``model_args`` (the flags, or a model config) that differ from their defaults, as a command line has them."""
    from dataclasses import fields

    from mmtrain.args import ModelArguments

    flags = []
    for f in fields(ModelArguments):
        if not hasattr(model_args, f.name):  # a model config holds only the model's own fields
            continue
        value = getattr(model_args, f.name)
        default = f.default
        if f.name in ("train_full_embeddings", "train_lm_head"):
            continue  # resolved from --lm_training
        if value != default:
            flags += [f"--{f.name}", str(value)]
    return flags


def command(option: Option, model_flags: list[str], seq_len: int) -> str:
    """The training command of ``option``: its Accelerate config, the model flags and the option's own."""
    flags = [*model_flags, "--max_tokens_per_batch", str(option.max_tokens_per_batch)]
    if option.max_tokens_per_batch < seq_len:
        flags += ["--max_seq_len", str(option.max_tokens_per_batch)]  # a budget holds whole samples
    if option.gradient_checkpointing:
        flags += ["--gradient_checkpointing", "true"]
    if option.base == "fp8":
        flags += ["--fp8_base", "true"]
    if option.base.startswith("nf4"):
        flags += ["--quantize_base", "nf4"]
    if option.base == "nf4+vision":
        flags += ["--quantize_vision", "nf4"]
    return f"accelerate launch --config_file accelerate_configs/{option.config_file} mmtrain/train.py " + " ".join(flags)


def per_setting(rows: list[Option]) -> list[Option]:
    """One row per base, offload and checkpointing: its fastest budget that fits, else its smallest peak; fastest first."""
    chosen: dict[tuple, Option] = {}
    for o in rows:
        key = (o.base, o.zero_stage, o.offload, o.gradient_checkpointing)
        have = chosen.get(key)
        if have is None or (o.fits, o.tokens_per_s if o.fits else -o.estimate.total) > (have.fits, have.tokens_per_s if have.fits else -have.estimate.total):
            chosen[key] = o
    return sorted(chosen.values(), key=lambda o: (not o.fits, -o.tokens_per_s))


def format_options(rows: list[Option], gpu_memory: int) -> str:
    """The table of :func:`per_setting`'s rows."""
    rows = per_setting(rows)
    lines = [f"{'option (one GPU)':<52}{'peak GiB':>10}{'fits ' + in_gib(gpu_memory) + ' GiB':>16}{'tokens/s (H200, predicted)':>28}"]
    lines.append("-" * len(lines[0]))
    for o in rows:
        lines.append(f"{o.name:<52}{in_gib(o.estimate.total):>10}{'yes' if o.fits else 'no':>16}{o.tokens_per_s:>28,.0f}")
    return "\n".join(lines)
