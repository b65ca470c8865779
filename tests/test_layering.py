"""The package's layers, read from the source with ``ast``: imports go down the tree only, modules stay small.

From the bottom: the leaves (``batch``, ``image_tokens``, ``presets``) and ``compat/``
import nothing of mmtrain; ``model/`` and ``data/`` import only those and themselves
(neither imports the other); everything that reads the command line (``args``, ``cli``,
``training/``, ``train``, ``memory``, ``export``, ``generate``, ``budget``) sits above.
Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmtrain"

LEAVES = ("mmtrain.batch", "mmtrain.image_tokens", "mmtrain.presets")
# What each layer may import from mmtrain besides itself (a prefix matches its submodules).
ALLOWED = {
    "mmtrain.compat": (),
    "mmtrain.model": ("mmtrain.compat", *LEAVES),
    "mmtrain.data": ("mmtrain.compat", *LEAVES),
    **{leaf: () for leaf in LEAVES},
}

MAX_LINES = 400
# Modules allowed past MAX_LINES, each for a stated reason; the test fails when one shrinks
# below the limit (take it off the list) and when any other grows past it.
LONG_MODULES = {
    # Every flag of the trainer with its help text and the checks that run before any weights
    # load: one typed dataclass per group, in one place (split it by group when it grows on).
    "mmtrain/args.py",
    # Saving and resuming, including the position mapping of a resume on another process count.
    "mmtrain/training/checkpoint.py",
    # The loop: micro-batches, token-weighted steps, evaluation, logging, checkpoints and exports.
    "mmtrain/training/loop.py",
    # The export command: the folder layout, LoRA merged in, the chat template and its check.
    "mmtrain/export.py",
    # Reading every dataset source and splitting it, before any weights load.
    "mmtrain/data/build.py",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every mmtrain module ``name`` imports (``from a import b`` counts ``a`` and ``a.b``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "mmtrain" or m.startswith("mmtrain.")}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> str | None:
    return next((layer for layer in ALLOWED if _within(module, layer)), None)


def _is_module(name: str, modules: dict[str, Path]) -> bool:
    # ``from mmtrain.model import fp8`` names a module; ``from mmtrain.batch import IGNORE_INDEX`` a value.
    return name in modules


def test_each_layer_imports_only_what_lies_below_it():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        layer = _layer(name)
        if layer is None:
            continue
        for target in _imports(name, path):
            if target == "mmtrain" or not _is_module(target, modules):
                continue  # the package itself (``from mmtrain import presets`` is checked as mmtrain.presets), or a value
            if _within(target, layer) or any(_within(target, allowed) for allowed in ALLOWED[layer]):
                continue
            wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that climb or cross the layers:\n" + "\n".join(sorted(wrong))


def test_the_rules_see_real_imports():
    """The checker itself: it finds the imports the model package is known to make, and would see a climb."""
    modules = _modules()
    assert "mmtrain.compat.transformers" in _imports("mmtrain.model.attention", modules["mmtrain.model.attention"])
    assert "mmtrain.image_tokens" in _imports("mmtrain.data.template", modules["mmtrain.data.template"])
    assert "mmtrain.args" in _imports("mmtrain.memory.cli", modules["mmtrain.memory.cli"])
    assert _layer("mmtrain.model.builder") == "mmtrain.model" and _layer("mmtrain.training.loop") is None


def test_data_and_model_are_independent():
    modules = _modules()
    for name, path in modules.items():
        for below, other in (("mmtrain.data", "mmtrain.model"), ("mmtrain.model", "mmtrain.data")):
            if _within(name, below):
                assert not any(_within(t, other) for t in _imports(name, path)), f"{name} imports {other}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_stay_under_the_line_limit(path):
    relative = str(path.relative_to(PACKAGE.parent))
    lines = len(path.read_text().splitlines())
    if relative in LONG_MODULES:
        assert lines > MAX_LINES, f"{relative} has {lines} lines now: take it off LONG_MODULES"
    else:
        assert lines <= MAX_LINES, f"{relative} has {lines} lines (> {MAX_LINES}): split it by concept, or allow it in LONG_MODULES with a reason"


def _reads_environment(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in ("environ", "getenv", "environb"):
            return True
        if isinstance(sub, ast.Name) and sub.id in ("environ", "getenv"):
            return True
    return False


def _import_time_statements(tree: ast.Module):
    """What runs when the module is imported: its body and class bodies, not function bodies."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Decorators and default values run at import; the body does not.
            yield from node.decorator_list
            yield from [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
        elif isinstance(node, ast.ClassDef):
            yield from node.decorator_list
            pending.extend(node.body)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            # Blocks at module level run at import: look inside them statement by statement.
            for field in ("test", "items", "iter"):
                if getattr(node, field, None) is not None:
                    value = getattr(node, field)
                    yield from value if isinstance(value, list) else [value]
            for field in ("body", "orelse", "finalbody"):
                pending.extend(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)
        else:
            yield node


def test_no_module_reads_the_environment_when_imported():
    readers = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        readers += [f"{name}:{node.lineno}" for node in _import_time_statements(tree) if _reads_environment(node)]
    assert not readers, "environment read at import time (read it where the setting is used, or make it a flag): " + ", ".join(readers)


def test_the_environment_check_sees_a_module_level_read():
    tree = ast.parse("import os\nSWITCH = os.environ.get('X', '1') != '0'\n\ndef later():\n    return os.environ.get('Y')\n")
    assert [node.lineno for node in _import_time_statements(tree) if _reads_environment(node)] == [2]
