"""Readers for conversation files, and the structural checks every record must pass.

Two layouts are understood, in JSON arrays, JSON Lines, or the ``datasets`` files of
:mod:`mmtrain.data.hub`, and any other through a ``--dataset_columns`` mapping:

* LLaVA: ``{"image": "a.png" | "images": [...], "conversations": [{"from": "human", "value": "<image>\\n..."}, ...]}``
  with ``from`` one of human/user, gpt/assistant, system.
* OpenAI-style messages: ``{"messages": [{"role": "user", "content": "..." | [{"type": "text", "text": ...}, {"type": "image"}]}],
  "images": [...]}``.

Either layout may hold videos: ``"video": "clip.mp4"`` (a clip file) or ``"video": ["f0.png",
"f1.png", ...]`` (its frames as images), or ``"videos": [...]`` of those, each marked by a
``<video>`` placeholder in a user turn (or a ``{"type": "video"}`` part); without
placeholders the videos go before the first question, as images do.

A preference pair (``--objective dpo``) is either layout cut after its last question, or
a ``prompt`` (a string, or a list of messages: TRL's layout) instead of the turns, plus
``chosen`` and ``rejected`` answers (strings, or one assistant message each)::

    {"images": [...], "conversations" | "messages" | "prompt": ..., "chosen": "...", "rejected": "..."}

Every record becomes one canonical record::

    {"turns": [{"role": "system"|"user"|"assistant", "text": str}, ...],  # <image> marks each image
     "images": [absolute image paths or embedded references (mmtrain.data.images), in placeholder order],
     "videos": [absolute clip paths, or frame paths as a JSON list (mmtrain.data.video), in <video> order],
     "source": file path, "index": record index in that file}

A pair's turns end on its chosen answer, and its canonical record adds
``"rejected": str``, the other answer to the same turns.

Every record is checked here, before training starts, without opening any image: a
broken file should fail in the first second, not after an hour of training.
"""

from __future__ import annotations

import json
import os

from mmtrain.data.images import embedded_ref, is_image_struct, is_pil, parse_embedded
from mmtrain.image_tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and record."""


class BadImageError(DataError):
    """An image (or video) file that is missing or cannot be decoded."""


def _where(source: str, index: int) -> str:
    return f"{source}: record {index}"


def _image_values(value, source: str, index: int, column: str, folder: str | None) -> list[str]:
    """The image strings of one column's value: paths (joined to ``folder``) or embedded references.

    A value is a path, a ``datasets.Image`` struct (``{"bytes", "path"}``: its bytes, else
    its path), a decoded PIL image, or a list of those.
    """
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    images = []
    for k, v in enumerate(values):
        if isinstance(v, str):
            images.append(v if parse_embedded(v) or not folder or os.path.isabs(v) else os.path.join(folder, v))
        elif is_image_struct(v):
            if v.get("bytes") is not None:
                if not isinstance(v["bytes"], (bytes, bytearray)):
                    raise DataError(f"{_where(source, index)}: column {column!r} image {k}: 'bytes' must be bytes, got {type(v['bytes']).__name__}")
                images.append(embedded_ref(source, index, column, k))
            elif isinstance(v.get("path"), str) and v["path"]:
                images += _image_values(v["path"], source, index, column, folder)
            else:
                raise DataError(f"{_where(source, index)}: column {column!r} image {k} has neither 'bytes' nor a 'path'")
        elif is_pil(v) or isinstance(v, (bytes, bytearray)):
            images.append(embedded_ref(source, index, column, k))
        else:
            raise DataError(
                f"{_where(source, index)}: column {column!r} must hold image paths or images ({{'bytes', 'path'}} structs), "
                f"got {type(v).__name__}"
            )
    return images


def _video_values(raw: dict, source: str, index: int, folder: str | None) -> list[str]:
    """A record's videos as canonical strings: a clip path, or its frame paths as a JSON list (joined to ``folder``)."""

    def path(value, what: str) -> str:
        if not isinstance(value, str) or not value:
            raise DataError(f"{_where(source, index)}: {what} must be a file path, got {type(value).__name__}")
        return value if not folder or os.path.isabs(value) else os.path.join(folder, value)

    def video(value, what: str) -> str:
        if isinstance(value, list):
            if not value:
                raise DataError(f"{_where(source, index)}: {what} is an empty list of frames")
            return json.dumps([path(v, f"{what} frame {k}") for k, v in enumerate(value)])
        return path(value, what)

    videos = []
    if raw.get("video") is not None:
        videos.append(video(raw["video"], "'video'"))
    if raw.get("videos") is not None:
        if not isinstance(raw["videos"], list):
            raise DataError(f"{_where(source, index)}: 'videos' must be a list of videos (paths or lists of frames)")
        videos += [video(v, f"'videos' item {k}") for k, v in enumerate(raw["videos"])]
    return videos


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
        elif kind == "video":
            pieces.append(VIDEO_PLACEHOLDER)
        else:
            raise DataError(f"{_where(source, index)}, turn {turn}: unknown content part type {kind!r} (valid: text, image, video)")
    # Parts are separate blocks; a newline after an image or video keeps the question readable.
    text = ""
    marks = (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)
    for piece in pieces:
        if text and not text.endswith("\n") and (piece in marks or text.endswith(marks)):
            text += "\n"
        text += piece
    return text


def _conversation(raw: dict, columns: dict, where: str) -> tuple[list, str, str]:
    """(the turns, their role key, their text key): a --dataset_columns mapping, else LLaVA, else messages."""
    if "messages" in columns:
        name = columns["messages"]
        if raw.get(name) is None:
            raise DataError(f"{where}: no column {name!r} (named by --dataset_columns messages={name})")
    elif raw.get("conversations") is not None:
        name = "conversations"
    elif raw.get("messages") is not None:
        name = "messages"
    else:
        raise DataError(f"{where}: no 'conversations' (LLaVA) or 'messages' column; name yours with --dataset_columns messages=COLUMN")
    turns = raw[name]
    if not isinstance(turns, list):
        raise DataError(f"{where}: column {name!r} must be a list of turns, got {type(turns).__name__}")
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    role_key = columns.get("role") or ("from" if "from" in first and "role" not in first else "role")
    text_key = columns.get("content") or ("value" if "value" in first and "content" not in first else "content")
    return turns, role_key, text_key


def normalize_record(raw, source: str, index: int, image_folder: str | None, columns: dict | None = None) -> dict:
    """Check one raw record and return it in canonical form (see the module docstring).

    ``columns`` is the ``--dataset_columns`` mapping (which column holds the turns, which
    the images, which keys the role and text, which role values mean user, assistant,
    system). Raises :class:`DataError` naming ``source`` and ``index`` on any structural
    problem: no turns, an unknown role, turns out of order, a last turn that is not an
    answer, an image value that is neither a path nor an image, or ``<image>``
    placeholders that do not match the number of images.
    """
    columns = columns or {}
    where = _where(source, index)
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if any(key in raw for key in PAIR_KEYS):
        return _pair_record(raw, source, index, image_folder, columns)
    turns_raw, role_key, text_key = _conversation(raw, columns, where)
    if not turns_raw:
        raise DataError(f"{where}: the conversation is empty")
    aliases = {**ROLE_ALIASES, **{str(columns[r]).lower(): r for r in ("user", "assistant", "system") if r in columns}}

    if "images" in columns:
        if columns["images"] not in raw:
            raise DataError(f"{where}: no column {columns['images']!r} (named by --dataset_columns images={columns['images']})")
        image_columns = [columns["images"]]
    else:
        image_columns = ["image", "images"]
    images = [i for c in image_columns for i in _image_values(raw.get(c), source, index, c, image_folder)]
    turns = []
    for t, turn in enumerate(turns_raw):
        if not isinstance(turn, dict):
            raise DataError(f"{where}, turn {t}: expected an object with '{role_key}' and '{text_key}'")
        role = aliases.get(str(turn.get(role_key)).lower()) if turn.get(role_key) is not None else None
        if role is None:
            raise DataError(
                f"{where}, turn {t}: unknown role {turn.get(role_key)!r} in '{role_key}' (valid: {', '.join(sorted(aliases))})"
            )
        content = turn.get(text_key)
        if isinstance(content, (str, list)):
            text = _message_text(content, source, index, t)
        else:
            raise DataError(f"{where}, turn {t}: '{text_key}' must be a string or a list of parts, got {type(content).__name__}")
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

    videos = _video_values(raw, source, index, image_folder)
    for mark, items, what in ((VIDEO_PLACEHOLDER, videos, "videos"), (IMAGE_PLACEHOLDER, images, "images")):
        for t, turn in enumerate(turns):
            if turn["role"] != "user" and mark in turn["text"]:
                raise DataError(f"{where}, turn {t}: {mark} placeholders are only allowed in user turns")
        placeholders = sum(turn["text"].count(mark) for turn in turns)
        if placeholders == 0 and items:
            # LLaVA convention: images (and videos) without placeholders go before the first question.
            body[0]["text"] = (mark + "\n") * len(items) + body[0]["text"]
        elif placeholders != len(items):
            raise DataError(f"{where}: {placeholders} {mark} placeholders but {len(items)} {what}")

    return {
        "turns": turns,
        "images": images,
        "videos": videos,
        "source": source,
        "index": index,
    }


PAIR_KEYS = ("chosen", "rejected")


def _answer(value, source: str, index: int, key: str) -> str:
    """A pair's answer as text: a string, or one assistant message (TRL's conversational layout)."""
    where = _where(source, index)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise DataError(f"{where}: {key!r} must be a string or a list of one assistant message, got {len(value)} items")
        message = value[0]
        role = message.get("role", message.get("from"))
        if ROLE_ALIASES.get(str(role).lower()) != "assistant":
            raise DataError(f"{where}: {key!r} holds a {role!r} message; it must be the assistant's answer")
        value = _message_text(message.get("content", message.get("value")), source, index, 0)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string or a list of one assistant message, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: the {key!r} answer is empty")
    for mark in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
        if mark in value:
            raise DataError(f"{where}: the {key!r} answer holds {mark}; images and videos belong to the prompt")
    return value


def _pair_record(raw: dict, source: str, index: int, image_folder: str | None, columns: dict) -> dict:
    """A preference pair's canonical record: its turns up to the last question, the chosen answer, and ``rejected``."""
    where = _where(source, index)
    for key in PAIR_KEYS:
        if raw.get(key) is None:
            other = PAIR_KEYS[1 - PAIR_KEYS.index(key)]
            raise DataError(f"{where}: a preference pair needs both 'chosen' and 'rejected'; this record has {other!r} but no {key!r}")
    chosen, rejected = _answer(raw["chosen"], source, index, "chosen"), _answer(raw["rejected"], source, index, "rejected")
    if chosen.strip() == rejected.strip():  # every margin would stay 0: the pair teaches nothing
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer; a preference pair needs two different ones")
    conversation = {k: v for k, v in raw.items() if k not in (*PAIR_KEYS, "prompt")}
    if raw.get("prompt") is not None:
        prompt = raw["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        conversation[columns.get("messages", "messages")] = prompt
    turns, role_key, text_key = _conversation(conversation, columns, where)
    last = turns[-1] if turns and isinstance(turns[-1], dict) else {}
    aliases = {**ROLE_ALIASES, **{str(columns[r]).lower(): r for r in ("user", "assistant", "system") if r in columns}}
    if aliases.get(str(last.get(role_key)).lower()) == "assistant":
        raise DataError(f"{where}: the prompt ends in an assistant turn; a pair's turns end on the question that 'chosen' and 'rejected' answer")
    assistant = columns.get("assistant") or ("gpt" if role_key == "from" else "assistant")
    name = next(key for key, value in conversation.items() if value is turns)
    conversation[name] = [*turns, {role_key: assistant, text_key: chosen}]
    record = normalize_record(conversation, source, index, image_folder, columns)
    record["rejected"] = rejected
    return record


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


def load_records(path: str, image_folder: str | None = None, columns: dict | None = None) -> list[dict]:
    """Load and check every record of ``path``; return canonical records in file order.

    ``image_folder`` resolves relative image paths (default: the folder of ``path``);
    ``columns`` is the ``--dataset_columns`` mapping.
    Images are not opened here; a missing file is found when the sample is read.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    folder = image_folder if image_folder else os.path.dirname(os.path.abspath(path))
    table = _read_raw(path)
    if len(table) == 0:
        raise DataError(f"{path}: no records")
    return [normalize_record(raw, path, i, folder, columns) for i, raw in enumerate(table)]
