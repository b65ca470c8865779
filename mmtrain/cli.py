"""Command lines of mmtrain's tools, generated from typed dataclasses as training's are (``mmtrain.args``).

A tool declares its flags as dataclass fields with a default and ``metadata={"help": ...}``
(``__post_init__`` checks values, raising :class:`~mmtrain.args.ConfigError`), reuses
``ModelArguments`` / ``DataArguments`` / ``TrainArguments`` for the settings it shares
with training, and parses with :class:`FlagParser`. Every field shows in ``--help`` with
its default; every error is one line, ``error: ...`` on stderr, exit status 2; a flag is
matched by its exact name only (``--max_step`` is not taken for ``--max_steps``).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys

from transformers import HfArgumentParser

# Not from mmtrain.args: args builds its parser from this module.
from mmtrain.model.errors import ConfigError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; description and epilog kept as written (module docstrings)."""


_ARGUMENT = re.compile(r"^argument (--?[\w-]+)(?:/--?[\w-]+)*: ", re.S)
_INVALID_VALUE = re.compile(r"^invalid (\w+) value: (.*)$", re.S)
_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string"}


def _plain(message: str) -> str:
    """argparse's message, flag named once: ``--max_steps: expected an integer, got 'ten'``."""
    m = _ARGUMENT.match(message)
    if not m:
        return message
    flag, rest = m.group(1), message[m.end():]
    invalid = _INVALID_VALUE.match(rest)
    if invalid and invalid.group(1) in _EXPECTED:
        rest = f"expected {_EXPECTED[invalid.group(1)]}, got {invalid.group(2)}"
    return f"{flag}: {rest}"


def fail(message: str) -> None:
    """The one error line every tool prints, then exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class FlagParser(HfArgumentParser):
    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        # argparse would take any unambiguous prefix (--max_step for --max_steps): a flag
        # misspelt today silently becomes another when a flag is added tomorrow.
        kwargs["allow_abbrev"] = False
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str):
        # argparse would print the whole usage first and exit; callers get one line instead.
        raise ConfigError(_plain(message))

    def parse_or_raise(self, argv: list[str] | None = None) -> tuple:
        """One instance per dataclass, from ``argv`` (default: ``sys.argv[1:]``); any error is a ConfigError.

        ``--help`` still prints the help and exits with status 0.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        # No ``.args`` file next to the script is read: the command line is the whole input.
        *parsed, rest = self.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
        if rest:
            raise ConfigError(self._unknown(rest))
        # Arguments added beside the dataclasses (training's --config) come back as a namespace: not wanted.
        return tuple(parsed[: len(self.dataclass_types)])

    def parse(self, argv: list[str] | None = None) -> tuple:
        """:meth:`parse_or_raise`, an error printed as one line with exit status 2."""
        try:
            return self.parse_or_raise(argv)
        except ConfigError as e:
            fail(str(e))

    def _unknown(self, rest: list[str]) -> str:
        message = f"unknown flags: {' '.join(rest)}"
        known = [o for o in self._option_string_actions if o.startswith("--") and "-" not in o[2:]]
        hints = []
        for arg in rest:
            if arg.startswith("--"):
                name = arg.split("=", 1)[0].replace("-", "_").replace("__", "--", 1)
                hints += difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if hints:
            return f"{message} (did you mean {', '.join(dict.fromkeys(hints))}? flags are matched by their exact name; see --help)"
        return f"{message} (see --help)"
