"""Command lines of mmtrain's tools, generated from typed dataclasses as training's are (``mmtrain.args``).

A tool declares its flags as dataclass fields with a default and ``metadata={"help": ...}``
(``__post_init__`` checks values, raising :class:`~mmtrain.args.ConfigError`), reuses
``ModelArguments`` / ``DataArguments`` / ``TrainArguments`` for the settings it shares
with training, and parses with :class:`FlagParser`. Every field shows in ``--help`` with
its default; every error is one line, ``error: ...`` on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from mmtrain.args import ConfigError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; description and epilog kept as written (module docstrings)."""


class FlagParser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str):
        # argparse would print the whole usage first; a tool's error is one line, as training's.
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse(self, argv: list[str] | None = None) -> tuple:
        """One instance per dataclass, from ``argv`` (default: ``sys.argv[1:]``); unknown flags are errors."""
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            # No ``.args`` file next to the script is read: the command line is the whole input.
            *parsed, rest = self.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
        except ConfigError as e:
            self.error(str(e))
        if rest:
            self.error(f"unknown flags: {' '.join(rest)} (see --help)")
        return tuple(parsed)
