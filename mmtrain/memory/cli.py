"""Per-GPU memory of a training step: ``python -m mmtrain.memory [model flags] [--json]``.

Prints the estimate at every rung of the ZeRO ladder and the fastest setup that fits ``--gpu_memory``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

from mmtrain.args import ConfigError, ModelArguments, naming_flags
from mmtrain.cli import FlagParser
from mmtrain.memory.facts import PRECISIONS, MemorySetup, in_gib, largest_micro_batch, model_facts, ref_model_args
from mmtrain.memory.options import best, command, format_options, model_flags, options
from mmtrain.memory.predict import MemoryEstimate, all_setups, estimate, recommend


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``24G``, ``40960MiB`` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"cannot read a memory size from {text!r} (e.g. 80GiB, 24GB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1024 if binary or not text.strip().upper().endswith("B") else 1000
    return int(value * base**power)


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
    ("checkpoint: host", "checkpoint_host"),
    ("checkpoint: disk", "checkpoint_disk"),
)


def format_table(estimates: list[MemoryEstimate]) -> str:
    width = max(15, *(len(e.setup.name) + 2 for e in estimates))
    lines = [f"{'GiB per GPU':<20}" + "".join(f"{e.setup.name:>{width}}" for e in estimates)]
    lines.append("-" * len(lines[0]))
    for label, attr in _ROWS:
        if attr in ("total", "cpu_weights", "checkpoint_host"):
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<20}" + "".join(f"{in_gib(getattr(e, attr)):>{width}}" for e in estimates))
    return "\n".join(lines)


@dataclass
class MemoryArguments:
    """The step the estimate is for, beside the model flags shared with training."""

    num_gpus: int = field(default=1, metadata={"help": "GPUs training runs on (ZeRO partitions over them)."})
    micro_batch: int = field(default=1, metadata={"help": "Samples per GPU per forward/backward (--per_device_train_batch_size)."})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sample, image tokens included."})
    max_tokens_per_batch: int = field(
        default=0,
        metadata={"help": "Training's token budget: the estimate is for its largest micro-batch, one packed row of this many tokens "
                  "(replaces --micro_batch and --seq_len; --images_per_sample then counts the images in that row)."},
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Training's --sequence_parallel_size: each row's positions split over this many GPUs (a divisor of "
                  "--num_gpus); the LM's activations and logits per GPU are divided by it, the images' are not."},
    )
    precision: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata={"help": "Compute dtype."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute the LM's activations in backward."})
    compiled: bool = field(
        default=False, metadata={"help": "LM decoder layers compiled, as training does on a GPU (--torch_compile auto): fewer activations kept."}
    )
    fp8_base: bool = field(
        default=False,
        metadata={"help": "The LM decoder layers' frozen Linears in float8 (training's --fp8_base): one byte a weight plus its scales; ZeRO 0-2."},
    )
    fp8_vision: bool = field(default=False, metadata={"help": "The vision tower's frozen Linears in float8 (training's --fp8_vision)."})
    quantize_base: Literal["none", "nf4"] = field(
        default="none",
        metadata={"help": "The LM decoder layers' frozen Linears in 4-bit NF4 (training's --quantize_base): 4.127 bits a weight; ZeRO 0-2."},
    )
    quantize_vision: Literal["none", "nf4"] = field(
        default="none", metadata={"help": "The vision tower's frozen Linears in NF4 (training's --quantize_vision)."}
    )
    float8_gpu: bool = field(
        default=False,
        metadata={"help": "The GPU has float8 tensor cores (Ada or Hopper, e.g. RTX 4090, L4, H100): float8 options may be recommended."},
    )
    objective: Literal["sft", "dpo"] = field(
        default="sft",
        metadata={"help": "training's --objective: dpo counts --micro_batch in pairs (two rows, images once) and the reference's starting copies."},
    )
    precompute_ref: bool = field(
        default=False,
        metadata={"help": "training's --precompute_ref (with --objective dpo): the reference's starting copies live only while "
                  "its log-probabilities are computed, before the first step."},
    )
    dpo_share_prompt: bool = field(
        default=True,
        metadata={"help": "training's --dpo_share_prompt (with --objective dpo): a pair's prompt computed once, so a pair "
                  "holds one row's tokens plus its second answer's (--label_fraction of the text tokens)."},
    )
    images_per_sample: int = field(default=1, metadata={"help": "Images in each sample."})
    label_fraction: float = field(default=0.25, metadata={"help": "Share of the text tokens that carry a label (the answers)."})
    gpu_memory: str = field(default="80GiB", metadata={"help": "Memory of one GPU, e.g. 24GiB, 40GB, 80GiB."})
    workload: Optional[Literal["ref-7b", "ref-13b"]] = field(
        default=None,
        metadata={"help": "A reference workload's model instead of the model flags: ref-7b (llama-2-7b + CLIP ViT-L/336, LoRA 16) "
                  "or ref-13b (llama-2-13b + ViT-bigG, perceiver projector, LoRA 16)."},
    )
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r}: valid: {', '.join(sorted(PRECISIONS))}")
        if self.precompute_ref and self.objective != "dpo":
            raise ConfigError("--precompute_ref applies to --objective dpo only; add --objective dpo or drop --precompute_ref")
        for name in ("num_gpus", "micro_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel_size < 1 or self.num_gpus % self.sequence_parallel_size:
            raise ConfigError(f"--sequence_parallel_size must be >= 1 and divide --num_gpus ({self.num_gpus}), got {self.sequence_parallel_size}")
        if self.max_tokens_per_batch < 0:
            raise ConfigError(f"--max_tokens_per_batch must be >= 0 (0: no budget), got {self.max_tokens_per_batch}")
        if self.images_per_sample < 0:
            raise ConfigError(f"--images_per_sample must be >= 0, got {self.images_per_sample}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise ConfigError(f"--label_fraction must be in [0, 1], got {self.label_fraction}")
        try:
            parse_bytes(self.gpu_memory)
        except ConfigError as e:
            raise ConfigError(f"--gpu_memory: {e}") from None

    def setup(self) -> MemorySetup:
        micro_batch, seq_len = largest_micro_batch(self.micro_batch, self.seq_len, self.max_tokens_per_batch)
        return MemorySetup(
            num_gpus=self.num_gpus,
            micro_batch=micro_batch,
            seq_len=seq_len,
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
            sequence_parallel=self.sequence_parallel_size,
            compiled=self.compiled,
            fp8_base=self.fp8_base,
            fp8_vision=self.fp8_vision,
            nf4_base=self.quantize_base == "nf4",
            nf4_vision=self.quantize_vision == "nf4",
            images_per_sample=self.images_per_sample,
            label_fraction=self.label_fraction,
            preference_pairs=self.objective == "dpo",
            precompute_ref=self.precompute_ref,
            shared_prompt=self.objective == "dpo" and self.dpo_share_prompt,
        )


def memory_parser() -> FlagParser:
    return FlagParser((ModelArguments, MemoryArguments), prog="python -m mmtrain.memory", description=__doc__)


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, opts = memory_parser().parse_or_raise(argv)
        if opts.workload:
            model_args = ref_model_args(opts.workload)
        base = opts.setup()
        gpu_memory = parse_bytes(opts.gpu_memory)
        facts = model_facts(model_args)
        estimates = [estimate(facts, s) for s in all_setups(base)]
        rec = recommend(facts, base, gpu_memory)
        rows = options(facts, base, gpu_memory)
    except ConfigError as e:
        print(f"error: {naming_flags(e)}", file=sys.stderr)  # the model package's errors name config fields: written as flags
        return 2
    choice = best(rows, float8_gpu=opts.float8_gpu)
    run = command(choice, model_flags(model_args), base.seq_len) if choice else None
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
                    "options": [
                        {
                            "name": o.name, "base": o.base, "zero_stage": o.zero_stage, "offload": o.offload,
                            "gradient_checkpointing": o.gradient_checkpointing, "max_tokens_per_batch": o.max_tokens_per_batch,
                            "total": o.estimate.total, "fits": o.fits, "tokens_per_s_h200": round(o.tokens_per_s),
                        }
                        for o in rows
                    ],
                    "recommended_option": None if choice is None else {"name": choice.name, "command": run},
                },
                indent=2,
            )
        )
    else:
        trainable = facts.total(trainable=True)
        print(f"{facts.total():,} parameters, {trainable:,} trainable; {base.num_gpus} GPU(s), micro-batch {base.micro_batch} x {base.seq_len} tokens, {base.precision}")
        print(format_table(estimates))
        print(f"recommended for {in_gib(gpu_memory)} GiB GPUs: {rec.reason}")
        print()
        print(format_options(rows, gpu_memory))
        if choice is None:
            print(f"no single-GPU option fits {in_gib(gpu_memory)} GiB: lower --seq_len or add GPUs")
        else:
            note = "" if opts.float8_gpu else " (float8 rows left out: pass --float8_gpu for an Ada or Hopper GPU)"
            print(f"fastest option that fits{note}: {choice.name}, {choice.tokens_per_s:,.0f} tokens/s predicted on an H200")
            print(f"  {run}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The console script's entry point: the exit status (0 done, 2 a bad flag or input)."""
    return main(argv)
