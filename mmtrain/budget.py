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
from dataclasses import asdict

from transformers import HfArgumentParser

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.model.builder import build_model
from mmtrain.model.counting import BYTES_PER_PARAM, ComponentBudget, budget_from_counts, count_parameters, format_table  # noqa: F401

def model_budget(model_args: ModelArguments, precision: str = "bf16") -> list[ComponentBudget]:
    """The budget table for ``model_args``, from a meta-device build."""
    built = build_model(model_args, meta=True)
    return budget_from_counts(count_parameters(built.model), precision)


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
