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

from mmtrain.args import ConfigError, ModelArguments, naming_flags
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
    quantize_base: Literal["none", "nf4"] = field(
        default="none", metadata={"help": "nf4: count the LM decoder layers' frozen Linears at 4.127 bits, as training's --quantize_base nf4 holds them."}
    )
    quantize_vision: Literal["none", "nf4"] = field(
        default="none", metadata={"help": "nf4: count the vision tower's frozen Linears at 4.127 bits (training's --quantize_vision nf4)."}
    )
    json: bool = field(default=False, metadata={"help": "Print JSON instead of a table."})

    def __post_init__(self):
        if self.precision not in BYTES_PER_PARAM:
            raise ConfigError(f"--precision {self.precision!r}: valid: {', '.join(sorted(BYTES_PER_PARAM))}")


def budget_parser() -> FlagParser:
    return FlagParser((ModelArguments, BudgetArguments), prog="python -m mmtrain.budget", description=__doc__)


def model_budget(
    model_args: ModelArguments, precision: str = "bf16", *, fp8_base: bool = False, fp8_vision: bool = False,
    nf4_base: bool = False, nf4_vision: bool = False,
) -> list[ComponentBudget]:
    """The budget table for ``model_args``, from a meta-device build (float8 layers converted there too).

    NF4 layers cannot be made on the meta device (bitsandbytes quantises real values): the
    Linears they would replace (:func:`mmtrain.model.nf4.quantizable_linears`) are counted
    at 4.127 bits instead.
    """
    speed = SpeedOptions(fp8_base=fp8_base, fp8_vision=fp8_vision, fp8_keep_originals=False) if (fp8_base or fp8_vision) else None
    built = build_model(model_args, meta=True, speed=speed)
    counts = count_parameters(built.model)
    if nf4_base or nf4_vision:
        from mmtrain.model.builder import float8_scopes
        from mmtrain.model.counting import component_of, numel
        from mmtrain.model.nf4 import quantizable_linears

        names = {id(m): n for n, m in built.model.named_modules()}
        by_name = {c.name: c for c in counts}
        for part, (root, scopes) in float8_scopes(built.model).items():
            if (part == "base" and nf4_base) or (part == "vision" and nf4_vision):
                for linear in quantizable_linears(root, scopes):
                    by_name[component_of(names[id(linear)] + ".weight")].nf4 += numel(linear.weight)
    return budget_from_counts(counts, precision)


def main(argv: list[str] | None = None) -> int:
    try:
        model_args, opts = budget_parser().parse_or_raise(argv)
        rows = model_budget(model_args, opts.precision, fp8_base=opts.fp8_base, fp8_vision=opts.fp8_vision,
                            nf4_base=opts.quantize_base == "nf4", nf4_vision=opts.quantize_vision == "nf4")
    except ConfigError as e:
        print(f"error: {naming_flags(e)}", file=sys.stderr)  # the model package's errors name config fields: written as flags
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
