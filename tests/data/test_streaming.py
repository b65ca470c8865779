"""The shard stream on its own: per-process parts, per-epoch order, exact resume, bad shards."""

from __future__ import annotations

import json

import pytest

from mmtrain.data.formats import DataError
from mmtrain.data.streaming import ShardStream, shard_files


def _write_shards(folder, shards: int = 4, per_shard: int = 10) -> str:
    for s in range(shards):
        with open(folder / f"part-{s}.jsonl", "w") as f:
            for i in range(per_shard):
                record = {"conversations": [{"from": "human", "value": f"q {s} {i}"}, {"from": "gpt", "value": "a"}]}
                f.write(json.dumps(record) + "\n")
    return str(folder / "part-*.jsonl")


def _stream(pattern, rank=0, world_size=1, buffer_size=8, on_bad_sample="error") -> ShardStream:
    return ShardStream(
        shard_files([pattern], []), lambda record: record["turns"][0]["text"], rank=rank, world_size=world_size, seed=3,
        buffer_size=buffer_size, on_bad_sample=on_bad_sample,
    )


def _take(stream: ShardStream, n: int | None = None) -> list[str]:
    ids = []
    while n is None or len(ids) < n:
        pair = stream.next_item()
        if pair is None:
            break
        ids.append(pair[0].rsplit("/", 1)[-1])
    return ids


def _epoch(stream: ShardStream, epoch: int) -> list[str]:
    stream.set_epoch(epoch)
    stream.start()
    return _take(stream)


def test_every_record_once_per_epoch_in_a_new_order(tmp_path):
    stream = _stream(_write_shards(tmp_path))
    first, second = _epoch(stream, 0), _epoch(stream, 1)
    assert sorted(first) == sorted(second) == sorted(f"part-{s}.jsonl:{i}" for s in range(4) for i in range(10))
    assert first != second
    assert _epoch(_stream(_write_shards(tmp_path)), 0) == first  # the order is the seed's and the epoch's alone


@pytest.mark.parametrize("shards", [4, 3])  # whole shards per process, or every other record
def test_processes_read_disjoint_parts_that_cover_the_epoch(tmp_path, shards):
    pattern = _write_shards(tmp_path, shards=shards)
    parts = [_epoch(_stream(pattern, rank=r, world_size=2), 0) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == shards * 10


def test_resume_from_a_state_continues_with_the_next_sample(tmp_path):
    pattern = _write_shards(tmp_path)
    whole = _stream(pattern)
    whole.set_epoch(1)
    whole.start()
    expected = _take(whole)

    cut = _stream(pattern)
    cut.set_epoch(1)
    cut.start()
    before = _take(cut, 13)
    state = json.loads(json.dumps(cut.state_dict()))  # as a checkpoint stores it
    resumed = _stream(pattern)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert resumed.start()
    assert before + _take(resumed) == expected


def test_a_truncated_shard_names_shard_record_and_byte(tmp_path):
    pattern = _write_shards(tmp_path, shards=2)
    path = tmp_path / "part-1.jsonl"
    text = path.read_bytes()
    path.write_bytes(text[: len(text) - 20])  # the last record cut off
    offset = text.rstrip(b"\n").rfind(b"\n") + 1
    with pytest.raises(DataError, match=rf"part-1.jsonl: record 9 \(byte {offset}\) is not valid JSON"):
        _epoch(_stream(pattern, buffer_size=1), 0)


def test_skip_drops_the_rest_of_a_bad_shard_and_counts_it(tmp_path):
    pattern = _write_shards(tmp_path, shards=2)
    path = tmp_path / "part-0.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = '{"conversations": [{"from": "human"'
    path.write_text("\n".join(lines) + "\n")
    stream = _stream(pattern, buffer_size=1, on_bad_sample="skip")
    ids = _epoch(stream, 0)
    assert sorted(i for i in ids if i.startswith("part-0")) == [f"part-0.jsonl:{i}" for i in range(4)]
    assert sum(i.startswith("part-1") for i in ids) == 10
    assert stream.skipped_bad_samples == 6  # the bad record and the five after it


def test_a_glob_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(DataError, match="matches no shard file"):
        shard_files([str(tmp_path / "none-*.jsonl")], [])


def test_parquet_shards_stream_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for s in range(2):
        rows = [{"conversations": [{"from": "human", "value": f"q {s} {i}"}, {"from": "gpt", "value": "a"}]} for i in range(5)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"part-{s}.parquet")
    ids = _epoch(_stream(str(tmp_path / "part-*.parquet")), 0)
    assert sorted(ids) == [f"part-{s}.parquet:{i}" for s in range(2) for i in range(5)]


def _write_tar(path, samples: int, start: int = 0) -> list[bytes]:
    """A WebDataset-layout tar: ``key.json`` + ``key.png`` per sample; returns the image bytes written."""
    import io
    import tarfile

    from PIL import Image

    written = []
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + samples):
            record = {"conversations": [{"from": "human", "value": f"<image>\nq {i}"}, {"from": "gpt", "value": "a"}], "image": "elsewhere.png"}
            png = io.BytesIO()
            Image.new("RGB", (4, 4), (i, 0, 0)).save(png, format="PNG")
            for name, data in ((f"s{i:04d}.json", json.dumps(record).encode()), (f"s{i:04d}.png", png.getvalue())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            written.append(png.getvalue())
    return written


def test_tar_shards_give_each_record_its_own_image_members(tmp_path):
    from mmtrain.data.tar_shards import open_member

    images = _write_tar(tmp_path / "a.tar", 3) + _write_tar(tmp_path / "b.tar", 2, start=3)
    stream = ShardStream(
        shard_files([str(tmp_path / "*.tar")], []), lambda r: (r["turns"][0]["text"], [open_member(p).getvalue() for p in r["images"]]),
        rank=0, world_size=1, seed=0, buffer_size=2, on_bad_sample="error",
    )
    stream.start()
    got = {}
    while (pair := stream.next_item()) is not None:
        got[pair[0].rsplit("/", 1)[-1]] = pair[1]
    assert sorted(got) == ["a.tar:0", "a.tar:1", "a.tar:2", "b.tar:0", "b.tar:1"]
    for shard, first in (("a", 0), ("b", 3)):
        for k in range(3 if shard == "a" else 2):
            text, pngs = got[f"{shard}.tar:{k}"]
            assert text.endswith(f"q {first + k}") and pngs == [images[first + k]]


# Each sample is four 512-byte blocks: the json's header and data, the png's header and data.
@pytest.mark.parametrize(
    ("cut", "last_whole"),
    [(512 * 9 + 100, 1), (512 * 8 + 100, 0), (512 * 8, 0)],  # in a member's data; in a header; at a header's start
)
def test_a_truncated_tar_names_the_shard_and_the_last_whole_sample(tmp_path, cut, last_whole):
    # A header cut short reads to tarfile as the archive's end: the missing end blocks tell,
    # and the sample before the cut may lack members, so it counts as cut too.
    _write_tar(tmp_path / "a.tar", 4)
    (tmp_path / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes()[:cut])
    stream = ShardStream(shard_files([str(tmp_path / "a.tar")], []), lambda r: r, rank=0, world_size=1, seed=0, buffer_size=1, on_bad_sample="error")
    stream.start()
    with pytest.raises(DataError, match=rf"a.tar: tar shard is truncated or damaged after sample {last_whole} \(byte \d+\)"):
        while stream.next_item() is not None:
            pass


def test_skip_keeps_a_truncated_tars_whole_samples_and_counts_the_damage(tmp_path):
    _write_tar(tmp_path / "a.tar", 4)
    (tmp_path / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes()[: 512 * 9 + 100])
    stream = ShardStream(shard_files([str(tmp_path / "a.tar")], []), lambda r: r, rank=0, world_size=1, seed=0, buffer_size=1, on_bad_sample="skip")
    ids = _epoch(stream, 0)
    assert sorted(ids) == ["a.tar:0", "a.tar:1"] and stream.skipped_bad_samples == 1
