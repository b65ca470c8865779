"""``from_pretrained`` that refuses to leave weights silently random."""

from __future__ import annotations

import json
import os

from safetensors import safe_open

from mmtrain.model.errors import ConfigError


def checked_from_pretrained(cls, path: str, *, field: str, strict_unexpected: bool = False, **kwargs):
    """Load ``cls`` from ``path``; a missing tensor (or, if ``strict_unexpected``, an extra one) is an error.

    transformers initialises missing weights randomly and only warns; for a frozen
    7B model that is a silent disaster, so we make it an error that names the folder.
    Unexpected tensors are normal when taking the vision half of a full CLIP checkpoint,
    so they are only fatal where we wrote the folder ourselves (exports). ``field`` is
    the config field that named ``path``.
    """
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing tensors: {_short(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"tensors of the wrong shape: {_short([k for k, *_ in info['mismatched_keys']])}")
    if strict_unexpected and info.get("unexpected_keys"):
        problems.append(f"unexpected tensors: {_short(info['unexpected_keys'])}")
    if problems:
        raise ConfigError(f"{field} {path!r} does not match its config: " + "; ".join(problems), fields=(field,))
    return model


def _short(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def safetensors_files(folder: str) -> dict[str, str] | None:
    """Tensor name -> file of a folder's ``model.safetensors`` or sharded index; None when it holds neither."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        return None
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}
