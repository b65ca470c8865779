"""What will train, and what does it cost? ``python -m mmtrain.budget [model flags] [--json]``.

Builds the model on the meta device (no weights read, no memory used), so
``llama-2-7b`` + ``clip-vit-bigG-14`` answers in seconds on a laptop. Counts come from
the very model object training would build; bytes assume mixed-precision Adam:

* weights: every parameter in the compute dtype (2 bytes in bf16/fp16, 4 in fp32), but
  with ``--fp8_base`` / ``--fp8_vision`` the frozen Linears those convert at one byte
  plus a 4-byte scale per output channel;
* gradients: trainable parameters only, in the compute dtype;
* optimizer states: trainable parameters only, fp32 master copy + Adam's two moments
  = 12 bytes per parameter (4 + 4 + 4; in fp32 training the master copy is the weight
  itself, so 8).

These are the model states of a single replica, before ZeRO partitioning; see
``mmtrain.memory`` for per-GPU figures with ZeRO stages, offload and activations.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.cli import FlagParser
from mmtrain.model.builder import build_model
from mmtrain.model.config import SpeedOptions
from mmtrain.model.counting import BYTES_PER_PARAM, ComponentBudget, budget_from_counts, count_parameters, format_table  # noqa: F401


@dataclass
class BudgetArguments:
    """The budget's own flags, beside the model flags it shares with training."""

    precision: Literal["bf16", "fp16", "fp32"] = field(
        default="bf16", metadata={"help": "Compute dtype the bytes assume (fp32: 4 bytes a value, else 2)."}
    )
    fp8_base: bool = field(default=False, metadata={"help": "Count the LM decoder layers' frozen Linears in float8, as training's --fp8_base holds them."})
    fp8_vision: bool = field(default=False, metadata={"help": "Count the vision tower's frozen Linears in float8 (training's --fp8_vision)."})
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})

    def __post_init__(self):
        if self.precision not in BYTES_PER_PARAM:
            raise ConfigError(f"--precision {self.precision!r}: valid: {', '.join(sorted(BYTES_PER_PARAM))}")


def budget_parser() -> FlagParser:
    return FlagParser((ModelArguments, BudgetArguments), prog="python -m mmtrain.budget", description=__doc__)


def model_budget(model_args: ModelArguments, precision: str = "bf16", *, fp8_base: bool = False, fp8_vision: bool = False) -> list[ComponentBudget]:
    """The budget table for ``model_args``, from a meta-device build (float8 layers converted there too)."""
    speed = SpeedOptions(fp8_base=fp8_base, fp8_vision=fp8_vision, fp8_keep_originals=False) if (fp8_base or fp8_vision) else None
    built = build_model(model_args, meta=True, speed=speed)
    return budget_from_counts(count_parameters(built.model), precision)


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, opts = budget_parser().parse_or_raise(argv)
        rows = model_budget(model_args, opts.precision, fp8_base=opts.fp8_base, fp8_vision=opts.fp8_vision)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts.json:
        print(json.dumps({"precision": opts.precision, "components": [asdict(r) for r in rows]}, indent=2))
    else:
        print(format_table(rows))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The console script's entry point: the exit status (0 done, 2 a bad flag or input)."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
