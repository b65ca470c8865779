"""Hub-shaped data: Parquet, Arrow, ``save_to_disk`` folders and cached Hub names, with embedded images, in memory and streamed."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.args import ConfigError, DataArguments
from mmtrain.data import DataError, build_datasets, read_sources, register_dataset
from mmtrain.data.dataset import BadImageError
from mmtrain.data.streaming import ShardStream, shard_files
from tests.hub_data import COLORS, LAYOUTS, MAPPED_COLUMNS, cache_as_hub_dataset, color_of, png_bytes, vqa_dataset, write_parquet_shards

ROWS = 6


def _args(names, **kw) -> DataArguments:
    kw.setdefault("eval_ratio", 0.0)
    return DataArguments(dataset_names=list(names), **kw)


def _expected_pixels(image_processor, row: int) -> torch.Tensor:
    from PIL import Image

    return image_processor(images=[Image.new("RGB", (16, 16), COLORS[color_of(row)])], return_tensors="pt")["pixel_values"][0]


def _shape(kind: str, tmp_path, monkeypatch) -> str:
    """One --dataset_names entry of ``kind`` holding vqa_dataset(ROWS)."""
    import datasets

    dataset = vqa_dataset(ROWS)
    if kind == "parquet":
        dataset.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    if kind == "arrow":
        dataset.save_to_disk(str(tmp_path / "saved"))
        (arrow,) = (tmp_path / "saved").glob("*.arrow")
        return str(arrow)
    if kind == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    if kind == "dataset_dict":
        datasets.DatasetDict({"train": vqa_dataset(2, start=3), "validation": dataset}).save_to_disk(str(tmp_path / "dict"))
        return str(tmp_path / "dict")
    if kind == "hub":
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
        cache_as_hub_dataset(dataset, "someone/colour-vqa", tmp_path / "cache")
        return "someone/colour-vqa"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["parquet", "arrow", "save_to_disk", "dataset_dict", "hub"])
def test_each_shape_trains_on_its_embedded_images_in_order(kind, tmp_path, monkeypatch, tokenizer, image_processor, image_tokens):
    name = _shape(kind, tmp_path, monkeypatch)
    args = _args([name], dataset_split="validation" if kind == "dataset_dict" else "train")
    bundle = build_datasets(args, tokenizer, image_processor, image_tokens)
    assert len(bundle.train) == ROWS
    for i in range(ROWS):
        item = bundle.train[i]
        assert item["pixel_values"].shape[0] == 1
        assert torch.allclose(item["pixel_values"][0], _expected_pixels(image_processor, i)), f"row {i} got another image"
        answer = tokenizer.decode(item["input_ids"][item["labels"] != -100])
        assert color_of(i) in answer
    # Neither the record table nor the store holds an image: the records name where each
    # lies, and the source table is the memory-mapped file datasets wrote.
    images = [p for record in bundle.train.records for p in record["images"]]
    assert len(images) == ROWS and all(isinstance(p, str) and p.startswith("embedded:") for p in images)
    (table,) = bundle.train.image_store.tables.values()
    assert table.cache_files, "the source table is held in memory, not memory-mapped"
    # The vision-feature cache keys an image by its pixels: an embedded image read again gets the same key.
    from mmtrain.model.vision_cache import image_key

    first, again = bundle.train[0]["pixel_values"][0], bundle.train[0]["pixel_values"][0]
    assert image_key(first) == image_key(again) != image_key(bundle.train[1]["pixel_values"][0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_conversation_layout_becomes_the_same_record(layout, tmp_path, tokenizer, image_processor, image_tokens):
    vqa_dataset(3, layout).to_parquet(str(tmp_path / "d.parquet"))
    columns = MAPPED_COLUMNS if layout == "mapped" else []
    sources = read_sources(_args([str(tmp_path / "d.parquet")], dataset_columns=columns))
    assert [r["turns"] for r in sources.train] == [
        [{"role": "user", "text": "<image>\nWhat colour is this?"}, {"role": "assistant", "text": color_of(i)}] for i in range(3)
    ]
    bundle = build_datasets(_args([str(tmp_path / "d.parquet")], dataset_columns=columns), tokenizer, image_processor, image_tokens, sources=sources)
    assert torch.allclose(bundle.train[2]["pixel_values"][0], _expected_pixels(image_processor, 2))


def test_images_as_paths_path_only_structs_and_decoded_pil_images(tmp_path, tokenizer, image_processor, image_tokens):
    import datasets
    from PIL import Image

    (tmp_path / "a.png").write_bytes(png_bytes(COLORS["green"]))
    conversation = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    plain = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    datasets.Dataset.from_dict(
        {"conversations": [conversation, conversation], "images": [["a.png"], [str(tmp_path / "a.png")]]}
    ).to_parquet(str(tmp_path / "paths.parquet"))
    datasets.Dataset.from_dict(
        {"conversations": [conversation], "images": [[{"bytes": None, "path": "a.png"}]]},
        features=datasets.Features({"conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}), "images": datasets.List(plain)}),
    ).to_parquet(str(tmp_path / "structs.parquet"))
    # A dataset built in Python from decoded images, as a registered dataset hands it over.
    decoded = datasets.Dataset.from_dict(
        {"conversations": [conversation], "images": [[Image.new("RGB", (16, 16), COLORS["green"])]]},
        features=datasets.Features({"conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}), "images": datasets.List(datasets.Image())}),
    )
    assert isinstance(decoded[0]["images"][0], Image.Image)
    register_dataset("decoded-colours", lambda data_args, seed: decoded)
    names = [str(tmp_path / "paths.parquet"), str(tmp_path / "structs.parquet"), "decoded-colours"]
    bundle = build_datasets(_args(names), tokenizer, image_processor, image_tokens)
    assert len(bundle.train) == 4
    green = _expected_pixels(image_processor, list(COLORS).index("green"))
    for i in range(4):
        assert torch.allclose(bundle.train[i]["pixel_values"][0], green)
    assert bundle.train.records[0]["images"] == [str(tmp_path / "a.png")]  # relative to the file's folder


# -- bad input, each one line naming file, record and column ---------------------------------


def _with_rows(tmp_path, data: dict, features=None) -> str:
    import datasets

    path = str(tmp_path / "bad.parquet")
    datasets.Dataset.from_dict(data, features=features).to_parquet(path)
    return path


CONVERSATION = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]


def test_a_missing_column_is_named(tmp_path):
    path = _with_rows(tmp_path, {"dialog": [CONVERSATION]})
    with pytest.raises(DataError, match=r"bad.parquet: record 0: no 'conversations' \(LLaVA\) or 'messages' column; name yours with --dataset_columns"):
        read_sources(_args([path]))
    with pytest.raises(DataError, match=r"bad.parquet: record 0: no column 'chat' \(named by --dataset_columns messages=chat\)"):
        read_sources(_args([path], dataset_columns=["messages=chat"]))
    path = _with_rows(tmp_path, {"conversations": [CONVERSATION]})
    with pytest.raises(DataError, match=r"record 0: no column 'pictures' \(named by --dataset_columns images=pictures\)"):
        read_sources(_args([path], dataset_columns=["images=pictures"]))


def test_a_column_of_the_wrong_type_is_named(tmp_path):
    with pytest.raises(DataError, match=r"bad.parquet: record 0: column 'messages' must be a list of turns, got str"):
        read_sources(_args([_with_rows(tmp_path, {"messages": ["hello"]})]))
    with pytest.raises(DataError, match=r"bad.parquet: record 0: column 'images' must hold image paths or images .*got int"):
        read_sources(_args([_with_rows(tmp_path, {"conversations": [CONVERSATION] * 2, "images": [[8], [7]]})]))


def test_an_image_struct_without_bytes_or_path_is_named(tmp_path):
    import datasets

    plain = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}), "image": plain})
    path = _with_rows(tmp_path, {"conversations": [CONVERSATION], "image": [{"bytes": None, "path": None}]}, features)
    with pytest.raises(DataError, match=r"bad.parquet: record 0: column 'image' image 0 has neither 'bytes' nor a 'path'"):
        read_sources(_args([path]))


def test_a_hub_name_not_in_the_cache_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match=r"--dataset_names 'someone/not-here' is not a file, a folder or a registered dataset, and no Hub dataset of that name is in .*empty-cache"):
        read_sources(_args(["someone/not-here"]))


def test_a_path_that_is_not_there_is_not_taken_for_a_hub_name(tmp_path):
    with pytest.raises(DataError, match=r"--dataset_names '.*gone.parquet': no such file or folder"):
        read_sources(_args([str(tmp_path / "gone.parquet")]))


def test_a_damaged_parquet_shard_is_named(tmp_path, image_processor):
    pattern = write_parquet_shards(tmp_path, shards=1, per_shard=3)
    data = (tmp_path / "part-0.parquet").read_bytes()
    (tmp_path / "part-0.parquet").write_bytes(data[: len(data) // 2])
    stream = _image_stream(pattern, image_processor)
    stream.start()
    with pytest.raises(DataError, match=r"part-0.parquet: shard cannot be read before its first record"):
        _drain(stream)


def test_a_missing_split_names_the_splits_there(tmp_path):
    import datasets

    datasets.DatasetDict({"train": vqa_dataset(2), "test": vqa_dataset(2)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"has splits test, train, not 'validation': pick one with --dataset_split"):
        read_sources(_args([str(tmp_path / "dict")], dataset_split="validation"))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    (tmp_path / "d.parquet").write_text('{"conversations": []}')
    with pytest.raises(DataError, match=r"d.parquet: cannot read as parquet"):
        read_sources(_args([str(tmp_path / "d.parquet")]))


@pytest.mark.parametrize("pair", ["speaker", "colour=x", "messages="])
def test_a_bad_column_mapping_is_refused_naming_the_flag(pair):
    with pytest.raises(ConfigError, match=rf"--dataset_columns '{pair}': expected KEY=VALUE"):
        _args(["x.json"], dataset_columns=[pair])


def _corrupt_second_image(tmp_path) -> str:
    dataset = vqa_dataset(3).to_dict()
    dataset["images"][1] = [{"bytes": b"\x89PNG not really", "path": None}]
    import datasets

    path = str(tmp_path / "corrupt.parquet")
    datasets.Dataset.from_dict(dataset, features=vqa_dataset(1).features).to_parquet(path)
    return path


def test_corrupt_image_bytes_are_an_error_naming_file_record_and_column(tmp_path, tokenizer, image_processor, image_tokens):
    path = _corrupt_second_image(tmp_path)
    bundle = build_datasets(_args([path]), tokenizer, image_processor, image_tokens)  # checked without decoding: it loads
    bundle.train[0]
    with pytest.raises(BadImageError, match=r"corrupt.parquet: record 1: column 'images' image 0 \(embedded\) cannot be decoded"):
        bundle.train[1]


def test_corrupt_image_bytes_are_skipped_and_counted(tmp_path, tokenizer, image_processor, image_tokens):
    bundle = build_datasets(_args([_corrupt_second_image(tmp_path)], on_bad_sample="skip"), tokenizer, image_processor, image_tokens)
    items = [bundle.train[i] for i in range(len(bundle.train))]
    # the bad one is dropped (the loader's batch loses it), never replaced by another sample
    assert sum(item is None for item in items) == 1
    assert all(item["pixel_values"].shape[0] == 1 for item in items if item is not None)
    assert bundle.train.skipped_bad_samples == 1


# -- streamed ------------------------------------------------------------------------------


def _image_stream(pattern, image_processor, rank=0, world_size=1, buffer_size=4, on_bad_sample="error", columns=None) -> ShardStream:
    from mmtrain.data.dataset import load_images
    from mmtrain.data.images import ImageStore

    store = ImageStore()

    def encode(record):
        images = [(p, record["source"], record["index"]) for p in record["images"]]
        return record["turns"][1]["text"], load_images(images, image_processor, (3, 64, 64), store)

    return ShardStream(
        shard_files([pattern], []), encode, rank=rank, world_size=world_size, seed=5, buffer_size=buffer_size,
        on_bad_sample=on_bad_sample, columns=columns,
    )


def _drain(stream: ShardStream, n: int | None = None) -> list[tuple[str, str, torch.Tensor]]:
    out = []
    while n is None or len(out) < n:
        pair = stream.next_item()
        if pair is None:
            break
        out.append((pair[0].rsplit("/", 1)[-1], *pair[1]))
    return out


def _row_of(sample_id: str, per_shard: int) -> int:
    shard, index = sample_id.split(":")
    return int(shard.split("-")[1].split(".")[0]) * per_shard + int(index)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parquet_shards_stream_their_embedded_images_and_resume_exactly(layout, tmp_path, image_processor):
    pattern = write_parquet_shards(tmp_path, shards=3, per_shard=4, layout=layout)
    columns = DataArguments(dataset_names=["x"], dataset_columns=MAPPED_COLUMNS).column_map() if layout == "mapped" else None
    whole = _image_stream(pattern, image_processor, columns=columns)
    whole.start()
    expected = _drain(whole)
    assert sorted(i for i, _, _ in expected) == sorted(f"part-{s}.parquet:{i}" for s in range(3) for i in range(4))
    for sample_id, answer, pixels in expected:
        row = _row_of(sample_id, 4)
        assert answer == color_of(row) and torch.allclose(pixels[0], _expected_pixels(image_processor, row))

    cut = _image_stream(pattern, image_processor, columns=columns)
    cut.start()
    before = _drain(cut, 5)
    state = cut.state_dict()
    saved = json.dumps(state)  # as a checkpoint stores it: no image bytes, only where each record lies
    assert "PNG" not in saved and len(saved) < 8000, len(saved)
    assert all(r["line"] and "embedded:" in r["line"] for r in state["buffer"])
    resumed = _image_stream(pattern, image_processor, columns=columns)
    resumed.load_state_dict(json.loads(saved))
    assert resumed.start()
    rest = _drain(resumed)
    assert [i for i, _, _ in before + rest] == [i for i, _, _ in expected]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(before + rest, expected))


def test_arrow_shards_stream_and_processes_read_disjoint_parts(tmp_path, image_processor):
    for s in range(2):
        vqa_dataset(3, start=3 * s).save_to_disk(str(tmp_path / f"saved-{s}"))
        (arrow,) = (tmp_path / f"saved-{s}").glob("*.arrow")
        arrow.rename(tmp_path / f"part-{s}.arrow")
    parts = []
    for rank in range(2):
        stream = _image_stream(str(tmp_path / "part-*.arrow"), image_processor, rank=rank, world_size=2)
        stream.start()
        parts.append(_drain(stream))
    ids = [i for part in parts for i, _, _ in part]
    assert sorted(ids) == sorted(f"part-{s}.arrow:{i}" for s in range(2) for i in range(3))
    assert not {i for i, _, _ in parts[0]} & {i for i, _, _ in parts[1]}
    for sample_id, answer, pixels in parts[0] + parts[1]:
        assert torch.allclose(pixels[0], _expected_pixels(image_processor, _row_of(sample_id, 3)))


def test_a_corrupt_image_in_a_stream_is_an_error_or_a_counted_skip(tmp_path, image_processor):
    import shutil

    (tmp_path / "shards").mkdir()
    shutil.copy(_corrupt_second_image(tmp_path), tmp_path / "shards" / "part-0.parquet")
    pattern = str(tmp_path / "shards" / "part-*.parquet")
    stream = _image_stream(pattern, image_processor, buffer_size=1)
    stream.start()
    with pytest.raises(BadImageError, match=r"part-0.parquet: record 1: column 'images' image 0 \(embedded\) cannot be decoded"):
        _drain(stream)
    stream = _image_stream(pattern, image_processor, buffer_size=1, on_bad_sample="skip")
    stream.start()
    assert [i for i, _, _ in _drain(stream)] == ["part-0.parquet:0", "part-0.parquet:2"]
    assert stream.skipped_bad_samples == 1


def test_a_save_to_disk_folder_streams_as_its_arrow_files(tmp_path, image_processor):
    vqa_dataset(3).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"matches no shard file \(a folder streams as its shard files, e\.g\. .*saved/\*\.arrow\)"):
        shard_files([str(tmp_path / "saved")], [])
    stream = _image_stream(str(tmp_path / "saved" / "*.arrow"), image_processor)
    stream.start()
    assert [answer for _, answer, _ in sorted(_drain(stream))] == [color_of(i) for i in range(3)]


def test_checking_every_record_reads_no_image_bytes(tmp_path):
    import os
    import tracemalloc

    import datasets

    from mmtrain.data.hub import dataset_records

    # Twenty 1 MB images (never decoded while checking, so any bytes do), one of them missing.
    rows = vqa_dataset(20).to_dict()
    rows["images"] = [[{"bytes": os.urandom(1 << 20), "path": None}] for _ in range(20)]
    rows["images"][7] = []
    datasets.Dataset.from_dict(rows, features=vqa_dataset(1).features).save_to_disk(str(tmp_path / "big"))
    table = datasets.load_from_disk(str(tmp_path / "big"))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"big: record 7: 1 <image> placeholders but 0 images"):
            dataset_records(table, str(tmp_path / "big"), None, None)
        rows["images"][7] = rows["images"][6]
        datasets.Dataset.from_dict(rows, features=vqa_dataset(1).features).save_to_disk(str(tmp_path / "big2"))
        tracemalloc.reset_peak()
        records = dataset_records(datasets.load_from_disk(str(tmp_path / "big2")), "big2", None, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(records) == 20 and all(r["images"][0].startswith("embedded:") for r in records)
    assert peak < 4 << 20, f"checking 20 MB of images allocated {peak / 2**20:.1f} MiB"
