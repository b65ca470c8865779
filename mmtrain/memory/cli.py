"""Per-GPU memory of a training step: ``python -m mmtrain.memory [model flags] [--json]``.

Prints the estimate at every rung of the ZeRO ladder and the fastest setup that fits ``--gpu_memory``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.memory.facts import PRECISIONS, MemorySetup, in_gib, model_facts
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
)


def format_table(estimates: list[MemoryEstimate]) -> str:
    width = max(15, *(len(e.setup.name) + 2 for e in estimates))
    lines = [f"{'GiB per GPU':<20}" + "".join(f"{e.setup.name:>{width}}" for e in estimates)]
    lines.append("-" * len(lines[0]))
    for label, attr in _ROWS:
        if attr == "total" or attr == "cpu_weights":
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<20}" + "".join(f"{in_gib(getattr(e, attr)):>{width}}" for e in estimates))
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
    # One parser for both, so that --help lists every flag.
    parser = HfArgumentParser(ModelArguments, prog="python -m mmtrain.memory", description=__doc__.splitlines()[0], parents=[extra])
    try:
        model_args, opts, leftover = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
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
        print(f"recommended for {in_gib(gpu_memory)} GiB GPUs: {rec.reason}")
    return 0
