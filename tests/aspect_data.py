"""A LLaVA-format dataset whose images have several aspect ratios (for AnyRes tiles): the
synthetic color questions, each scene set on a wide, tall, small or large canvas."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from mmtrain.data.synthetic import _single_question, render_shapes

# (width, height) of the canvases the 64 px synthetic scenes are set on, in turn
CANVASES = [(160, 64), (64, 150), (40, 40), (200, 120), (64, 64)]


def write_aspect_dataset(folder: Path, num_samples: int, seed: int = 0) -> Path:
    """Write ``folder/train.json`` and its images (once; an existing file is reused); returns the JSON's path."""
    path = folder / "train.json"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        shapes, [(question, answer, _)] = _single_question("color", rng)
        width, height = CANVASES[i % len(CANVASES)]
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(render_shapes(shapes[0]).resize((min(64, width), min(64, height))), (0, 0))
        canvas.save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(path)  # rows running side by side may both write it; each rename is whole
    return path
