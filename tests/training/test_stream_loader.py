"""The stream loader: worker parts (disjoint, covering the epoch, in a seeded order) and token budgets, resumable after any batch."""

from __future__ import annotations

import json

import pytest
import torch

from mmtrain.data.formats import DataError
from mmtrain.data.streaming import ShardStream, shard_files
from mmtrain.training.sample_record import INDICES_KEY
from mmtrain.training.stream_loader import StreamLoader


class _OneProcess:
    """What the loader uses of an Accelerator, for one process on CPU."""

    device = torch.device("cpu")
    num_processes = 1

    def gather(self, tensor):
        return tensor


def _write_shards(folder, shards: int = 3, per_shard: int = 10) -> str:
    for s in range(shards):
        with open(folder / f"part-{s}.jsonl", "w") as f:
            for i in range(per_shard):
                f.write(json.dumps({"conversations": [{"from": "human", "value": f"q {s} {i}"}, {"from": "gpt", "value": "a"}]}) + "\n")
    return str(folder / "part-*.jsonl")


def _sized_item(record: dict) -> dict:
    """An item of 10 tokens, and 20 more with an image when the question's record number is odd."""
    odd = int(record["turns"][0]["text"].split()[-1]) % 2
    return {"input_ids": [0] * (10 + 20 * odd), "pixel_values": torch.zeros(odd, 1)}


def _loader(pattern: str, workers: int, seed: int = 3, budget=None) -> StreamLoader:
    stream = ShardStream(
        shard_files([pattern], []), _sized_item, rank=0, world_size=1, seed=seed, buffer_size=4, on_bad_sample="error",
    )
    return StreamLoader(
        _OneProcess(), stream, lambda items: {"items": items}, batch_size=3, record_samples=True, num_workers=workers, budget=budget
    )


def _epoch(loader: StreamLoader, epoch: int, stop_after: int | None = None) -> list[list[str]]:
    loader.set_epoch(epoch)
    batches = []
    for batch in loader:
        batches.append([i.rsplit("/", 1)[-1] for i in batch[INDICES_KEY]])
        if len(batches) == stop_after:
            break
    return batches


def test_workers_cover_the_epoch_once_in_an_order_of_seed_and_epoch(tmp_path):
    pattern = _write_shards(tmp_path)
    first = _epoch(_loader(pattern, 2), 0)
    ids = [i for batch in first for i in batch]
    assert sorted(ids) == sorted(f"part-{s}.jsonl:{i}" for s in range(3) for i in range(10))
    assert _epoch(_loader(pattern, 2), 0) == first
    assert _epoch(_loader(pattern, 2), 1) != first
    assert _epoch(_loader(pattern, 2, seed=4), 0) != first


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 9])  # inside the first turn, on and off a turn's end, after a part ended
@pytest.mark.parametrize(("workers", "budget"), [(2, None), (0, (50, 2)), (2, (50, 2))])
def test_resume_after_any_batch_continues_as_uninterrupted(tmp_path, cut, workers, budget):
    pattern = _write_shards(tmp_path)
    expected = _epoch(_loader(pattern, workers, budget=budget), 1)
    loader = _loader(pattern, workers, budget=budget)
    before = _epoch(loader, 1, stop_after=cut)
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    resumed = _loader(pattern, workers, budget=budget)
    resumed.load_state_dict(state)
    assert before + _epoch(resumed, 1) == expected


def test_a_budget_fills_each_batch_with_whole_samples_in_stream_order(tmp_path):
    pattern = _write_shards(tmp_path)
    loader = _loader(pattern, 0, budget=(50, 1))
    loader.set_epoch(0)
    batches = list(loader)
    ids = [i for b in batches for i in b[INDICES_KEY]]
    assert sorted(ids) == sorted(f"{tmp_path}/part-{s}.jsonl:{i}" for s in range(3) for i in range(10))
    plain = _loader(pattern, 0)  # the same stream without a budget: the same samples in the same order
    plain.set_epoch(0)
    assert ids == [i for b in plain for i in b[INDICES_KEY]]
    for batch, following in zip(batches, batches[1:] + [None]):
        tokens = sum(len(item["input_ids"]) for item in batch["items"])
        images = sum(item["pixel_values"].shape[0] for item in batch["items"])
        assert tokens <= 50 and images <= 1
        if following is not None:  # full: the next sample would not have fitted
            first = following["items"][0]
            assert tokens + len(first["input_ids"]) > 50 or images + first["pixel_values"].shape[0] > 1


def test_a_position_saved_with_another_worker_count_is_refused(tmp_path):
    pattern = _write_shards(tmp_path)
    loader = _loader(pattern, 2)
    _epoch(loader, 0, stop_after=1)
    with pytest.raises(DataError, match="--num_workers 2 .* --num_workers 0"):
        _loader(pattern, 0).load_state_dict(loader.state_dict())
