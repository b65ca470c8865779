"""The embedded default dataset: rendered shapes with questions only the image answers.

Each image is 64x64 (the ``tiny-clip`` preset's size) with big flat shapes on white:
3 shapes (circle, square, triangle) in 4 colours (red, green, blue, yellow). Question
types, each answered by one word:

==================== ========================================================== ==========================
type                 question                                                   answers
==================== ========================================================== ==========================
color                What color is the shape?                                   red / green / blue / yellow
shape                What shape is in the image?                                circle / square / triangle
count                How many shapes are in the image?                          one / two / three / four
position_horizontal  Is the shape on the left or the right?                     left / right
position_vertical    Is the shape at the top or the bottom?                     top / bottom
compare              (two images) Which image has more {c} shapes? Answer ...   first / second
text                 (no image) simple facts, e.g. What number comes after two? words
==================== ========================================================== ==========================

Some samples ask two questions about the same image (multi-turn). Answers are drawn
uniformly and every other attribute independently of the answer, so the question text
alone predicts nothing beyond chance: :func:`majority_baseline` measures it.

:func:`generate_synthetic_pairs` writes preference pairs of the same images and
questions (``--objective dpo``): the chosen answer is the right one, the rejected one a
wrong answer of the same question type, drawn uniformly, so again only the image tells
them apart.

The set is deterministic in ``seed`` and written once: to a temporary folder renamed
into place when complete, so an interrupted run is never mistaken for a finished one
and two processes generating at once both end up with the same complete folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
GENERATOR_VERSION = 2  # bump when the output changes, so old folders are not reused
COMPLETE_MARKER = "COMPLETE"

QUESTIONS = {
    "color": "What color is the shape?",
    "shape": "What shape is in the image?",
    "count": "How many shapes are in the image?",
    "position_horizontal": "Is the shape on the left or the right?",
    "position_vertical": "Is the shape at the top or the bottom?",
    "compare": "Which image has more {color} shapes? Answer first or second.",
}
IMAGE_QUESTION_TYPES = tuple(QUESTIONS)

# Facts answerable from text alone, so that text-only batches exist during training.
TEXT_FACTS = (
    ("What number comes after one?", "two"),
    ("What number comes after two?", "three"),
    ("What number comes after three?", "four"),
    ("What number comes before two?", "one"),
    ("What number comes before four?", "three"),
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("What color is the sky?", "blue"),
    ("What color is grass?", "green"),
    ("What color is a banana?", "yellow"),
    ("What color is a tomato?", "red"),
    ("Is a circle a shape or a color?", "shape"),
)

# Share of each sample kind; "multi_turn" asks two single-image questions about one shape.
# Colour and position are read off almost any encoder; shape and count need more data.
SAMPLE_MIX = (
    ("color", 0.12),
    ("shape", 0.20),  # the harder concepts get more examples
    ("count", 0.20),
    ("position_horizontal", 0.08),
    ("position_vertical", 0.08),
    ("compare", 0.10),
    ("multi_turn", 0.14),
    ("text", 0.08),
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: int
    cy: int
    size: int  # width and height of the bounding box in pixels


def render_shapes(shapes: list[Shape], size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``shapes`` on a white ``size`` x ``size`` RGB image."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        half = s.size // 2
        box = (s.cx - half, s.cy - half, s.cx + half, s.cy + half)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, s.cy - half), (s.cx - half, s.cy + half), (s.cx + half, s.cy + half)], fill=fill)
    return image


def _single_shape(rng: random.Random, kind=None, color=None, horizontal=None, vertical=None) -> Shape:
    """One salient shape; a requested side puts its centre clearly in that half."""
    size = rng.randint(26, 32)
    half = size // 2 + 1

    def coordinate(side):
        if side in ("left", "top"):
            return rng.randint(half, 22)
        if side in ("right", "bottom"):
            return rng.randint(IMAGE_SIZE - 22, IMAGE_SIZE - half)
        return rng.randint(half, IMAGE_SIZE - half)

    return Shape(kind or rng.choice(SHAPES), color or rng.choice(list(COLORS)), coordinate(horizontal), coordinate(vertical), size)


def _scattered_shapes(rng: random.Random, n: int, color=None) -> list[Shape]:
    """``n`` (1..4) alike shapes in distinct quadrants, so they never overlap and stay countable.

    One kind and colour per image: counting blobs is what is asked, not telling them apart.
    """
    cells = rng.sample([(16, 16), (48, 16), (16, 48), (48, 48)], n)
    kind, color, size = rng.choice(SHAPES), color or rng.choice(list(COLORS)), rng.randint(18, 22)
    return [Shape(kind, color, x + rng.randint(-2, 2), y + rng.randint(-2, 2), size) for x, y in cells]


def _single_question(kind: str, rng: random.Random):
    """(images as shape lists, [(question, answer, type)]) for one question type."""
    if kind == "color":
        shape = _single_shape(rng, color=rng.choice(list(COLORS)))
        return [[shape]], [(QUESTIONS[kind], shape.color, kind)]
    if kind == "shape":
        # Bigger and near the centre: outlines are the hardest concept for a small encoder.
        size = rng.randint(32, 40)
        shape = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), 32 + rng.randint(-6, 6), 32 + rng.randint(-6, 6), size)
        return [[shape]], [(QUESTIONS[kind], shape.kind, kind)]
    if kind == "count":
        n = rng.randint(1, 4)
        return [_scattered_shapes(rng, n)], [(QUESTIONS[kind], NUMBER_WORDS[n], kind)]
    if kind == "position_horizontal":
        side = rng.choice(("left", "right"))
        return [[_single_shape(rng, horizontal=side)]], [(QUESTIONS[kind], side, kind)]
    if kind == "position_vertical":
        side = rng.choice(("top", "bottom"))
        return [[_single_shape(rng, vertical=side)]], [(QUESTIONS[kind], side, kind)]
    if kind == "compare":
        answer = rng.choice(("first", "second"))
        color = rng.choice(list(COLORS))
        more, fewer = sorted(rng.sample(range(1, 5), 2), reverse=True)
        counts = (more, fewer) if answer == "first" else (fewer, more)
        images = [_scattered_shapes(rng, c, color=color) for c in counts]
        return images, [(QUESTIONS[kind].format(color=color), answer, kind)]
    if kind == "multi_turn":
        first, second = rng.sample(("color", "shape", "position_horizontal"), 2)
        side = rng.choice(("left", "right"))
        shape = _single_shape(rng, horizontal=side)
        answers = {"color": shape.color, "shape": shape.kind, "position_horizontal": side}
        return [[shape]], [(QUESTIONS[t], answers[t], t) for t in (first, second)]
    if kind == "text":
        question, answer = rng.choice(TEXT_FACTS)
        return [], [(question, answer, "text")]
    raise ValueError(f"unknown synthetic question kind {kind!r}; valid: {', '.join(k for k, _ in SAMPLE_MIX)}")


def render_question(kind: str = "color", seed: int = 0) -> dict:
    """A fresh example of ``kind`` (a question type, ``multi_turn`` or ``text``) to ask a trained model.

    Returns ``{"images": [PIL images], "question": first question (with <image>
    placeholders), "answer": its answer, "turns": [(question, answer, type), ...]}``.
    """
    shapes, turns = _single_question(kind, random.Random(seed))
    placeholders = "<image>\n" * len(shapes)
    return {
        "images": [render_shapes(s) for s in shapes],
        "question": placeholders + turns[0][0],
        "answer": turns[0][1],
        "turns": turns,
    }


def _records(num_samples: int, seed: int):
    rng = random.Random(seed)
    kinds, weights = zip(*SAMPLE_MIX)
    for i in range(num_samples):
        kind = rng.choices(kinds, weights)[0]
        shapes, turns = _single_question(kind, rng)
        yield i, shapes, turns


# Every answer a question type can have: a pair's rejected answer is another of them.
ANSWERS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": NUMBER_WORDS[1:],
    "position_horizontal": ("left", "right"),
    "position_vertical": ("top", "bottom"),
    "compare": ("first", "second"),
}
# The types whose answers a small encoder reads off quickly: pairs learn in a CPU minute.
PAIR_QUESTION_TYPES = ("color", "position_horizontal", "position_vertical")


def _write_pairs(folder: str, num_samples: int, seed: int) -> None:
    os.makedirs(os.path.join(folder, "images"))
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        kind = rng.choice(PAIR_QUESTION_TYPES)
        shapes, [(question, answer, _)] = _single_question(kind, rng)
        rel = f"images/{i:05d}_0.png"
        render_shapes(shapes[0]).save(os.path.join(folder, rel), format="PNG")
        rejected = rng.choice([a for a in ANSWERS[kind] if a != answer])
        records.append({
            "id": f"synthetic-pairs-{seed}-{i:05d}", "images": [rel],
            "conversations": [{"from": "human", "value": "<image>\n" + question}],
            "chosen": answer, "rejected": rejected, "question_types": [kind],
        })
    with open(os.path.join(folder, "train.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
        f.write(f"version={GENERATOR_VERSION} seed={seed} num_samples={num_samples}\n")


def _write(folder: str, num_samples: int, seed: int) -> None:
    os.makedirs(os.path.join(folder, "images"))
    records = []
    for i, shapes, turns in _records(num_samples, seed):
        paths = []
        for k, image_shapes in enumerate(shapes):
            rel = f"images/{i:05d}_{k}.png"
            render_shapes(image_shapes).save(os.path.join(folder, rel), format="PNG")
            paths.append(rel)
        conversations = []
        for t, (question, answer, _) in enumerate(turns):
            prefix = "<image>\n" * len(paths) if t == 0 else ""
            conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
        record = {"id": f"synthetic-{seed}-{i:05d}", "conversations": conversations, "question_types": [t for _, _, t in turns]}
        if paths:
            record["images"] = paths
        records.append(record)
    with open(os.path.join(folder, "train.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
        f.write(f"version={GENERATOR_VERSION} seed={seed} num_samples={num_samples}\n")


def _is_complete(folder: str, num_samples: int, seed: int) -> bool:
    marker = os.path.join(folder, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return False
    with open(marker) as f:
        return f.read().strip() == f"version={GENERATOR_VERSION} seed={seed} num_samples={num_samples}"


def generate_synthetic_pairs(folder: str, num_samples: int = 3000, seed: int = 0) -> str:
    """Write synthetic preference pairs (colour and position questions) to ``folder`` and return the path of ``train.json``.

    Each record: ``{"images": [path], "conversations": [the question], "chosen": the right
    answer, "rejected": a wrong one of the same type}``. Written as :func:`generate_synthetic`.
    """
    return generate_synthetic(folder, num_samples, seed, writer=_write_pairs)


def generate_synthetic(folder: str, num_samples: int = 3000, seed: int = 0, writer=None) -> str:
    """Write the synthetic VQA set to ``folder`` (LLaVA JSON + PNGs) and return the path of ``train.json``.

    Reuses a complete folder of the same seed and size. Generation happens in a
    private temporary folder renamed into place at the end; when two processes race,
    the first rename wins and the other discards its copy (both are identical).
    ``writer(folder, num_samples, seed)``: another set's writer (the pairs').
    """
    folder = os.path.abspath(folder)
    train_json = os.path.join(folder, "train.json")
    if _is_complete(folder, num_samples, seed):
        return train_json
    if os.path.exists(folder):
        raise FileExistsError(
            f"{folder} exists but is not a complete synthetic set of seed {seed} and {num_samples} samples; remove it"
        )
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (writer or _write)(tmp, num_samples, seed)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder, num_samples, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return train_json


def majority_baseline(records: list[dict]) -> dict:
    """How well answering without looking at any image can do, on synthetic records.

    Returns ``{"per_type": {type: {"count", "majority_answer", "baseline"}},
    "overall": ..., "question_lookup": ..., "single_answer": ...}`` where ``overall``
    is the accuracy over image questions of always giving each type's most frequent
    answer, ``question_lookup`` that of the best answer per exact question string (the
    strongest text-only guess), and ``single_answer`` that of one answer for all.
    ``text`` questions are reported per type but excluded from the overall figures.
    """
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_question: dict[str, Counter] = defaultdict(Counter)
    all_answers: Counter = Counter()
    for record in records:
        types = record["question_types"]
        turns = record["conversations"]
        for t, qtype in enumerate(types):
            question = turns[2 * t]["value"].replace("<image>\n", "")
            answer = turns[2 * t + 1]["value"]
            by_type[qtype][answer] += 1
            if qtype != "text":
                by_question[question][answer] += 1
                all_answers[answer] += 1
    per_type = {}
    for qtype, counts in sorted(by_type.items()):
        answer, hits = counts.most_common(1)[0]
        per_type[qtype] = {"count": sum(counts.values()), "majority_answer": answer, "baseline": hits / sum(counts.values())}
    n_image = sum(all_answers.values())
    if n_image == 0:
        return {"per_type": per_type, "overall": 0.0, "question_lookup": 0.0, "single_answer": 0.0}
    return {
        "per_type": per_type,
        "overall": sum(by_type[t].most_common(1)[0][1] for t in by_type if t != "text") / n_image,
        "question_lookup": sum(c.most_common(1)[0][1] for c in by_question.values()) / n_image,
        "single_answer": all_answers.most_common(1)[0][1] / n_image,
    }
