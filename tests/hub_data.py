"""Hub-shaped test data: conversations with embedded PNG images, written by ``datasets`` itself.

Each row shows one solid colour and asks for its name, so a model can learn it and a
test can tell from the pixels which image landed where.
"""

from __future__ import annotations

import io
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
LAYOUTS = ("messages", "conversations", "mapped")
# What --dataset_columns takes for the "mapped" layout.
MAPPED_COLUMNS = ["messages=dialog", "images=pictures", "role=speaker", "content=text", "user=customer", "assistant=agent"]


def color_of(row: int) -> str:
    return list(COLORS)[row % len(COLORS)]


def png_bytes(rgb, size=(16, 16)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="PNG")
    return out.getvalue()


def vqa_dataset(rows: int, layout: str = "messages", start: int = 0):
    """A ``datasets.Dataset`` of ``rows`` colour questions in ``layout``, each image a ``datasets.Image`` with PNG bytes."""
    import datasets

    question, names = "What colour is this?", [color_of(start + i) for i in range(rows)]
    images = [{"bytes": png_bytes(COLORS[n]), "path": None} for n in names]
    if layout == "messages":
        part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
        features = datasets.Features({
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)}),
            "images": datasets.List(datasets.Image()),
        })
        data = {
            "messages": [
                [
                    {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": n}]},
                ]
                for n in names
            ],
            "images": [[image] for image in images],
        }
    elif layout == "conversations":
        turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
        features = datasets.Features({"conversations": datasets.List(turn), "image": datasets.Image()})
        data = {
            "conversations": [[{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": n}] for n in names],
            "image": images,
        }
    elif layout == "mapped":
        turn = {"speaker": datasets.Value("string"), "text": datasets.Value("string")}
        features = datasets.Features({"dialog": datasets.List(turn), "pictures": datasets.List(datasets.Image()), "id": datasets.Value("int64")})
        data = {
            "dialog": [[{"speaker": "customer", "text": question}, {"speaker": "agent", "text": n}] for n in names],
            "pictures": [[image] for image in images],
            "id": list(range(start, start + rows)),
        }
    else:
        raise ValueError(layout)
    return datasets.Dataset.from_dict(data, features=features)


def write_parquet_shards(folder: Path, shards: int, per_shard: int, layout: str = "messages") -> str:
    """``shards`` Parquet files of ``per_shard`` rows each (``part-N.parquet``); returns their glob."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        vqa_dataset(per_shard, layout, start=s * per_shard).to_parquet(str(folder / f"part-{s}.parquet"))
    return str(folder / "part-*.parquet")


def cache_as_hub_dataset(dataset, name: str, cache_dir: Path) -> None:
    """Leave ``dataset`` in ``cache_dir`` as ``datasets.load_dataset(name)`` leaves a Hub dataset it downloaded.

    The parquet builder prepares it under the dataset's own name; the folder is then named
    as a Hub download's is (``namespace___name/default/<version>/<hash>``).
    """
    import glob
    import os
    import tempfile

    import datasets

    namespace, _, short = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.parquet")
        dataset.to_parquet(path)
        builder = datasets.load_dataset_builder("parquet", data_files={"train": path}, cache_dir=tmp)
        builder = type(builder)(cache_dir=tmp, dataset_name=short, data_files={"train": path}, hash="0123abcd")
        builder.download_and_prepare()
        (prepared,) = glob.glob(os.path.join(tmp, short, "*"))
        os.renames(prepared, os.path.join(cache_dir, f"{namespace}___{short}" if namespace else short, "default"))
