"""Every command line: all its flags in --help, one-line errors naming the flag, exact flag names only."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _train(argv):
    """training's entry point as ``python -m mmtrain.train`` runs it, in this process: its exit status."""
    from mmtrain import train

    old = sys.argv
    sys.argv = ["mmtrain.train", *argv]
    try:
        return train.cli()
    finally:
        sys.argv = old


def _budget(argv):
    from mmtrain.budget import main

    return main(argv)


def _memory(argv):
    from mmtrain.memory import main

    return main(argv)


def _generate(argv):
    from mmtrain.generate import main

    return main(argv)


def _export(argv):
    from mmtrain.export import main

    return main(argv)


def _dataclasses(tool: str) -> tuple:
    from mmtrain.args import ALL_ARGUMENTS, ModelArguments

    if tool == "train":
        return ALL_ARGUMENTS
    if tool == "budget":
        from mmtrain.budget import BudgetArguments

        return (ModelArguments, BudgetArguments)
    if tool == "memory":
        from mmtrain.memory.cli import MemoryArguments

        return (ModelArguments, MemoryArguments)
    if tool == "generate":
        from mmtrain.generate import GenerateArguments

        return (GenerateArguments,)
    from mmtrain.export import ExportArguments

    return (ExportArguments,)


TOOLS = {"train": _train, "budget": _budget, "memory": _memory, "generate": _generate, "export": _export}


def _run(tool: str, argv: list[str]) -> int:
    """The tool's exit status, whether it returns it or raises SystemExit."""
    try:
        return TOOLS[tool](argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_lists_every_field(tool, capsys):
    assert _run(tool, ["--help"]) == 0
    text = capsys.readouterr().out
    missing = [f.name for cls in _dataclasses(tool) for f in dataclasses.fields(cls) if f"--{f.name}" not in text]
    assert not missing, f"{tool} --help does not list {missing}"
    if tool == "train":
        assert "--config" in text and "--verbose" in text
    if tool == "budget":
        assert "--json" in text and "--precision" in text and "{bf16,fp16,fp32}" in text


# One bad value for each tool, and the flag its error line must name.
BAD_VALUES = [
    ("train", ["--max_steps", "ten"], "--max_steps", "integer"),
    ("train", ["--lr_scheduler_type", "cosin"], "--lr_scheduler_type", "'cosine', 'linear', 'constant'"),
    ("train", ["--lm_model_name_or_path", "no/such/folder"], "--lm_model_name_or_path", "presets: "),
    ("budget", ["--lang_lora_dim", "ten"], "--lang_lora_dim", "integer"),
    ("budget", ["--precision", "fp8"], "--precision", "'bf16', 'fp16', 'fp32'"),
    ("memory", ["--seq_len", "ten"], "--seq_len", "integer"),
    ("memory", ["--gpu_memory", "lots"], "--gpu_memory", "80GiB"),
    ("memory", ["--num_gpus", "0"], "--num_gpus", ">= 1"),
    ("generate", ["--model", "m", "--prompt", "hi", "--max_new_tokens", "ten"], "--max_new_tokens", "integer"),
    ("generate", ["--model", "m", "--prompt", "hi", "--dtype", "int8"], "--dtype", "'fp32', 'bf16', 'fp16'"),
    ("export", ["--model", "m", "--out", "o", "--format", "gguf"], "--format", "'llava'"),
]


@pytest.mark.parametrize(("tool", "argv", "flag", "valid"), BAD_VALUES, ids=[f"{t}{a[-2]}" for t, a, _, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_flag(tool, argv, flag, valid, capsys):
    assert _run(tool, argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert flag in lines[0] and valid in lines[0], lines[0]
    assert "usage:" not in captured.out + captured.err


# A prefix of a real flag (argparse would take it for the flag), and a flag of another tool.
PREFIXES = [
    ("train", ["--max_step", "3"], "--max_step", "--max_steps"),
    ("train", ["--learning_rat", "1e-3"], "--learning_rat", "--learning_rate"),
    ("budget", ["--prec", "fp32"], "--prec", None),
    ("memory", ["--num_gpu", "2"], "--num_gpu", "--num_gpus"),
    ("generate", ["--model", "m", "--prompt", "hi", "--max_new", "3"], "--max_new", None),
    ("export", ["--model", "m", "--out", "o", "--form", "llava"], "--form", None),
]


@pytest.mark.parametrize(("tool", "argv", "unknown", "hint"), PREFIXES, ids=[f"{t}{u}" for t, _, u, _ in PREFIXES])
def test_a_prefix_of_a_flag_is_refused(tool, argv, unknown, hint, capsys):
    assert _run(tool, argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: unknown flags: {unknown} "), lines
    if hint:
        assert f"did you mean {hint}?" in lines[0]


def test_exact_names_and_their_dashed_spelling_still_parse():
    from mmtrain.args import parse_args

    _, data_args, train_args = parse_args(["--max_steps", "3", "--max-new-tokens", "5", "--packing", "--overwrite_output_dir=true"])
    assert train_args.max_steps == 3 and train_args.max_new_tokens == 5 and data_args.packing and train_args.overwrite_output_dir


def test_training_entry_point_prints_only_the_error_line():
    """What a user sees from ``python -m mmtrain.train`` with a mistyped value: one line on stderr, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "mmtrain.train", "--max_steps", "ten"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: --max_steps: expected an integer, got 'ten'"], proc.stderr
    assert proc.stdout == ""


def test_precision_choices_are_the_byte_tables_keys():
    """The flags' choices are written out for --help; they must stay the tables' keys."""
    from typing import get_args, get_type_hints

    from mmtrain.budget import BudgetArguments
    from mmtrain.memory.cli import MemoryArguments
    from mmtrain.memory.facts import PRECISIONS
    from mmtrain.model.counting import BYTES_PER_PARAM

    assert sorted(get_args(get_type_hints(BudgetArguments)["precision"])) == sorted(BYTES_PER_PARAM)
    assert sorted(get_args(get_type_hints(MemoryArguments)["precision"])) == sorted(PRECISIONS)
