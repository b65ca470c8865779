"""Sequence parallelism's data side: a group's processes get the same rows, each cut to its columns with the right targets."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from mmtrain.batch import IGNORE_INDEX
from mmtrain.data.packing import PackingCollator
from mmtrain.data.sequence_shard import EpochShuffledBatches, GroupedBatches, shard_batch
from mmtrain.model import build_model

from .test_packing import _items


@pytest.fixture(scope="module")
def packed(model_folders):
    from mmtrain.args import ModelArguments

    built = build_model(ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], lang_lora_dim=0))
    items = _items(built, [(1, 9), (0, 12), (2, 4), (1, 30), (0, 3)])
    return PackingCollator(built.tokenizer.pad_token_id, 180, pad_to_multiple_of=4)(items)


@pytest.mark.parametrize("size", [2, 4])
def test_the_shards_of_a_row_hold_its_targets_positions_and_tokens_once(packed, size):
    shards = [shard_batch(packed, rank, size) for rank in range(size)]
    targets = torch.cat([s["labels"] for s in shards], dim=1)
    # The targets were shifted before the cut: column t of the row predicts token t + 1.
    assert torch.equal(targets[:, :-1], packed["labels"][:, 1:]) and (targets[:, -1] == IGNORE_INDEX).all()
    assert sum(s["label_positions"].numel() for s in shards) == packed["label_positions"].numel() > 0
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], dim=1), packed["position_ids"])
    assert sum(int(s["attention_mask"].sum()) for s in shards) == int(packed["attention_mask"].sum())
    for rank, s in enumerate(shards):
        # The whole row's tokens, images and segment offsets stay: every process embeds the whole row.
        assert s["input_ids"] is packed["input_ids"] and s["cu_seq_lens"] is packed["cu_seq_lens"]
        assert s["sequence_shard"] == (rank, size)
        width = packed["input_ids"].shape[1] // size
        assert torch.equal(s["labels"].flatten()[s["label_positions"]], s["labels"][s["labels"] != IGNORE_INDEX])
        assert s["labels"].shape == (packed["input_ids"].shape[0], width)


def test_rows_that_do_not_split_evenly_are_refused(packed):
    with pytest.raises(ValueError, match="cannot be split in 3 equal parts"):
        shard_batch(packed, 0, 3)


def test_unpacked_rows_get_their_positions(packed):
    plain = {k: packed[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts")}
    shard = shard_batch(plain, 1, 2)
    width = plain["input_ids"].shape[1] // 2
    assert torch.equal(shard["position_ids"][0], torch.arange(width, 2 * width))


@pytest.mark.parametrize("processes,size", [(2, 2), (4, 2), (6, 3)])
def test_accelerates_sharding_gives_a_groups_processes_the_same_batches(processes, size):
    """Batch i goes to process i % processes: repeated N times, a group of N consecutive processes takes the same ones."""

    class Dataset:
        epoch = 0

        def __len__(self):
            return 23  # not a multiple of anything here: the last round is completed from the first batches

    batches = GroupedBatches(EpochShuffledBatches(Dataset(), 2, seed=7), size)
    per_process = [list(BatchSamplerShard(batches, processes, rank, split_batches=False, even_batches=True)) for rank in range(processes)]
    assert len({len(p) for p in per_process}) == 1
    for group in range(processes // size):
        members = per_process[group * size : (group + 1) * size]
        assert all(m == members[0] for m in members)
    seen = {i for group in range(processes // size) for batch in per_process[group * size] for i in batch}
    assert seen == set(range(23))  # every sample trained on, by some group


def test_the_shuffled_order_follows_the_epoch():
    class Dataset:
        epoch = 0

        def __len__(self):
            return 10

    data = Dataset()
    batches = EpochShuffledBatches(data, 3, seed=1)
    first, again = list(batches), list(batches)
    data.epoch = 1
    assert first == again and list(batches) != first and len(batches) == 4
