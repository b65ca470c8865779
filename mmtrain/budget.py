"""What will train, and what does it cost? ``python -m mmtrain.budget [model flags] [--json]``.

Builds the model on the meta device (no weights read, no memory used), so
``llama-2-7b`` + ``clip-vit-bigG-14`` answers in seconds on a laptop. Counts come from
the very model object training would build; bytes assume mixed-precision Adam:

* weights: every parameter in the compute dtype (2 bytes in bf16/fp16, 4 in fp32);
* gradients: trainable parameters only, in the compute dtype;
* optimizer states: trainable parameters only, fp32 master copy + Adam's two moments
  = 12 bytes per parameter (4 + 4 + 4; in fp32 training the master copy is the weight
  itself, so 8).

These are the model states of a single replica, before ZeRO partitioning; see
``mmtrain.memory`` for per-GPU figures with ZeRO stages, offload and activations.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from transformers import HfArgumentParser

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.model.builder import ComponentCount, build_model, count_parameters

BYTES_PER_PARAM = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class ComponentBudget:
    name: str
    total: int
    trainable: int
    frozen: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int


def budget_from_counts(counts: list[ComponentCount], precision: str = "bf16") -> list[ComponentBudget]:
    width = BYTES_PER_PARAM[precision]
    optimizer_per_param = 8 if precision == "fp32" else 12
    rows = [
        ComponentBudget(
            name=c.name,
            total=c.total,
            trainable=c.trainable,
            frozen=c.frozen,
            weight_bytes=c.total * width,
            gradient_bytes=c.trainable * width,
            optimizer_bytes=c.trainable * optimizer_per_param,
        )
        for c in counts
    ]
    total = ComponentBudget("total", *[sum(getattr(r, f) for r in rows) for f in ("total", "trainable", "frozen", "weight_bytes", "gradient_bytes", "optimizer_bytes")])
    return rows + [total]


def model_budget(model_args: ModelArguments, precision: str = "bf16") -> list[ComponentBudget]:
    """The budget table for ``model_args``, from a meta-device build."""
    built = build_model(model_args, meta=True)
    return budget_from_counts(count_parameters(built.model), precision)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000
    return f"{n:.3g}T{unit}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**24 else f"{n / 2**20:.2f} MiB"


def format_table(rows: list[ComponentBudget]) -> str:
    header = f"{'component':<22}{'total':>10}{'trainable':>11}{'frozen':>10}{'weights':>13}{'grads':>13}{'optimizer':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.name == "total":
            lines.append("-" * len(header))
        lines.append(
            f"{r.name:<22}{_human(r.total):>10}{_human(r.trainable):>11}{_human(r.frozen):>10}"
            f"{_gib(r.weight_bytes):>13}{_gib(r.gradient_bytes):>13}{_gib(r.optimizer_bytes):>13}"
        )
    total = rows[-1]
    share = 100.0 * total.trainable / max(total.total, 1)
    lines.append(f"trainable: {total.trainable:,} of {total.total:,} parameters ({share:.3f}%)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--json", action="store_true", help="print JSON instead of a table")
    extra.add_argument("--precision", choices=sorted(BYTES_PER_PARAM), default="bf16", help="compute dtype")
    opts, rest = extra.parse_known_args(argv)
    parser = HfArgumentParser(ModelArguments, description=__doc__.splitlines()[0])
    try:
        (model_args, leftover) = parser.parse_args_into_dataclasses(rest, return_remaining_strings=True)
        if leftover:
            raise ConfigError(f"unknown flags: {' '.join(leftover)} (model flags, --json and --precision only)")
        rows = model_budget(model_args, opts.precision)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.json:
        print(json.dumps({"precision": opts.precision, "components": [asdict(r) for r in rows]}, indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
