"""Readers for conversation files, and the structural checks every record must pass.

Two on-disk formats are understood, both as a JSON array or as JSON Lines:

* LLaVA: ``{"image": "a.png" | "images": [...], "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``
  with ``from`` one of human/user, gpt/assistant, system.
* OpenAI-style messages: ``{"messages": [{"role": "user", "content": "..." | [{"type": "text", "text": ...}, {"type": "image"}]}],
  "images": [...]}``.

Both become one canonical record::

    {"turns": [{"role": "system"|"user"|"assistant", "text": str}, ...],  # <image> marks each image
     "images": [absolute image paths, in placeholder order],
     "source": file path, "index": record index in that file}

Every record is checked here, before training starts, without opening any image: a
broken file should fail in the first second, not after an hour of training.
"""

from __future__ import annotations

import json
import os

from mmtrain.model.tokens import IMAGE_PLACEHOLDER

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and record."""


def _where(source: str, index: int) -> str:
    return f"{source}: record {index}"


def _as_list_of_paths(value, source: str, index: int, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataError(f"{_where(source, index)}: '{key}' must be a path or a list of paths, got {type(value).__name__}")


def _message_text(content, source: str, index: int, turn: int) -> str:
    """Flatten an OpenAI-style content (a string or a list of parts) to text with <image> marks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{_where(source, index)}, turn {turn}: 'content' must be a string or a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(f"{_where(source, index)}, turn {turn}: a text part needs a string 'text'")
            pieces.append(text)
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_PLACEHOLDER)
        else:
            raise DataError(f"{_where(source, index)}, turn {turn}: unknown content part type {kind!r} (valid: text, image)")
    # Parts are separate blocks; a newline after an image keeps the question readable.
    text = ""
    for piece in pieces:
        if text and not text.endswith("\n") and (piece == IMAGE_PLACEHOLDER or text.endswith(IMAGE_PLACEHOLDER)):
            text += "\n"
        text += piece
    return text


def normalize_record(raw, source: str, index: int, image_folder: str) -> dict:
    """Check one raw record and return it in canonical form (see the module docstring).

    Raises :class:`DataError` naming ``source`` and ``index`` on any structural problem:
    no turns, an unknown role, turns out of order, a last turn that is not an answer,
    or ``<image>`` placeholders that do not match the number of images.
    """
    where = _where(source, index)
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("conversations") is not None:
        turns_raw, role_key, text_key = raw["conversations"], "from", "value"
    elif raw.get("messages") is not None:
        turns_raw, role_key, text_key = raw["messages"], "role", "content"
    else:
        raise DataError(f"{where}: no 'conversations' (LLaVA) or 'messages' list")
    if not isinstance(turns_raw, list) or not turns_raw:
        raise DataError(f"{where}: the conversation is empty")

    images = _as_list_of_paths(raw.get("image"), source, index, "image") + _as_list_of_paths(
        raw.get("images"), source, index, "images"
    )
    turns = []
    for t, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise DataError(f"{where}, turn {t}: expected an object with '{role_key}' and '{text_key}'")
        role = ROLE_ALIASES.get(str(turn.get(role_key)).lower()) if turn.get(role_key) is not None else None
        if role is None:
            raise DataError(
                f"{where}, turn {t}: unknown role {turn.get(role_key)!r} (valid: {', '.join(sorted(ROLE_ALIASES))})"
            )
        content = turn.get(text_key)
        if role_key == "role":
            text = _message_text(content, source, index, t)
        elif isinstance(content, str):
            text = content
        else:
            raise DataError(f"{where}, turn {t}: '{text_key}' must be a string, got {type(content).__name__}")
        turns.append({"role": role, "text": text})

    # Order: an optional system turn, then user/assistant pairs, ending on an answer.
    body = turns[1:] if turns[0]["role"] == "system" else turns
    if not body:
        raise DataError(f"{where}: only a system turn, no question and answer")
    for t, turn in enumerate(body):
        expected = "user" if t % 2 == 0 else "assistant"
        if turn["role"] != expected:
            offset = len(turns) - len(body)
            raise DataError(f"{where}, turn {t + offset}: expected a {expected} turn, got {turn['role']}")
    if body[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn is a question with no answer")

    for t, turn in enumerate(turns):
        if turn["role"] != "user" and IMAGE_PLACEHOLDER in turn["text"]:
            raise DataError(f"{where}, turn {t}: {IMAGE_PLACEHOLDER} placeholders are only allowed in user turns")
    placeholders = sum(turn["text"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders == 0 and images:
        # LLaVA convention: images without placeholders go before the first question.
        body[0]["text"] = (IMAGE_PLACEHOLDER + "\n") * len(images) + body[0]["text"]
    elif placeholders != len(images):
        raise DataError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")

    return {
        "turns": turns,
        "images": [p if os.path.isabs(p) else os.path.join(image_folder, p) for p in images],
        "source": source,
        "index": index,
    }


def _read_raw(path: str):
    """Read a JSON/JSONL file with `datasets` (Arrow-backed, cached), stdlib json to explain failures."""
    import datasets

    try:
        was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            return datasets.load_dataset("json", data_files=path, split="train")
        finally:
            if was:
                datasets.enable_progress_bars()
    except Exception as err:  # datasets wraps parse errors; find the exact spot for the message
        _explain_unreadable(path, err)
        raise  # unreachable: _explain_unreadable always raises


def _explain_unreadable(path: str, err: Exception) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole:
        # Maybe JSON Lines: find the first bad line, which is record index = line number - 1 among non-empty lines.
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1:
            for i, line in enumerate(lines):
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: record {i} (line {i + 1}) is not valid JSON: {e.msg}") from None
        raise DataError(f"{path}: not valid JSON or JSON Lines: {whole.msg} at line {whole.lineno} column {whole.colno}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records (or JSON Lines), got {type(data).__name__}")
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(raw).__name__}")
    raise DataError(f"{path}: cannot load: {err}") from None


def load_records(path: str, image_folder: str | None = None) -> list[dict]:
    """Load and check every record of ``path``; return canonical records in file order.

    ``image_folder`` resolves relative image paths (default: the folder of ``path``).
    Images are not opened here; a missing file is found when the sample is read.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    folder = image_folder if image_folder else os.path.dirname(os.path.abspath(path))
    table = _read_raw(path)
    if len(table) == 0:
        raise DataError(f"{path}: no records")
    return [normalize_record(raw, path, i, folder) for i, raw in enumerate(table)]
