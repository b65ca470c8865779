"""Preference pairs: the layouts read, the checks before weights load, one item per pair, and pair batches."""

from __future__ import annotations

import pytest
import torch

from mmtrain.args import DataArguments
from mmtrain.data import DataError, build_datasets, load_records, read_sources
from mmtrain.data.preference import PairCollator, PairPackingCollator, pairs_in

from .conftest import save_solid, write_json


def _pairs(tmp_path, records, name="pairs.json"):
    save_solid(tmp_path / "red.png", (255, 0, 0))
    save_solid(tmp_path / "blue.png", (0, 0, 255))
    return write_json(tmp_path / name, records)


LAYOUTS = {
    "llava": {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat color?"}], "chosen": "red", "rejected": "blue"},
    "prompt": {"images": ["red.png"], "prompt": "<image>\nWhat color?", "chosen": "red", "rejected": "blue"},
    "trl": {
        "images": ["red.png"],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
        "rejected": [{"role": "assistant", "content": "blue"}],
    },
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_becomes_turns_ending_on_chosen_plus_rejected(tmp_path, layout):
    (record,) = load_records(_pairs(tmp_path, [LAYOUTS[layout]]))
    assert record["turns"] == [{"role": "user", "text": "<image>\nWhat color?"}, {"role": "assistant", "text": "red"}]
    assert record["rejected"] == "blue"
    assert record["images"] == [str(tmp_path / "red.png")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rejected": None}, "pairs.json: record 1: a preference pair needs both 'chosen' and 'rejected'; this record has 'chosen' but no 'rejected'"),
        ({"chosen": "  "}, "pairs.json: record 1: the 'chosen' answer is empty"),
        ({"rejected": [{"role": "user", "content": "x"}]}, "pairs.json: record 1: 'rejected' holds a 'user' message"),
        (
            {"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
            "pairs.json: record 1: the prompt ends in an assistant turn",
        ),
        ({"chosen": "<image> red"}, "pairs.json: record 1: the 'chosen' answer holds <image>"),
        ({"chosen": "blue "}, "pairs.json: record 1: 'chosen' and 'rejected' are the same answer"),
    ],
)
def test_a_bad_pair_is_one_line_naming_file_and_record(tmp_path, change, message):
    bad = {k: v for k, v in {**LAYOUTS["llava"], **change}.items() if v is not None}
    with pytest.raises(DataError) as err:
        load_records(_pairs(tmp_path, [LAYOUTS["llava"], bad]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pairs_and_conversations_each_need_their_objective(tmp_path):
    path = _pairs(tmp_path, [LAYOUTS["llava"]])
    with pytest.raises(DataError, match=r"record 0 is a preference pair \('chosen'/'rejected'\): train pairs with --objective dpo"):
        read_sources(DataArguments(dataset_names=[path], eval_ratio=0.0))
    sft = write_json(tmp_path / "sft.json", [{"image": "red.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    with pytest.raises(DataError, match="record 0 is a conversation, not a preference pair"):
        read_sources(DataArguments(dataset_names=[sft], eval_ratio=0.0), pairs=True)


def test_a_pair_is_one_item_and_a_batch_holds_chosen_rows_then_rejected_rows_with_images_once(tmp_path, tokenizer, image_tokens, image_processor):
    records = [
        LAYOUTS["llava"],
        {"image": "blue.png", "conversations": [{"from": "human", "value": "<image>\nWhich?"}], "chosen": "blue sky", "rejected": "red"},
        {"conversations": [{"from": "human", "value": "No image here?"}], "chosen": "yes", "rejected": "no it is not"},
    ]
    args = DataArguments(dataset_names=[_pairs(tmp_path, records)], eval_ratio=0.0)
    data = build_datasets(args, tokenizer, image_processor, image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    assert len(data.train) == 3
    items = [data.train[i] for i in range(3)]
    batch = PairCollator(tokenizer.pad_token_id)(items)
    assert pairs_in(batch) == 3 and batch["image_repeats"] == 2
    assert batch["input_ids"].shape[0] == 6
    assert batch["pixel_values"].shape[0] == 2  # two pairs with one image each, once
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[1]["pixel_values"]]))
    assert batch["image_counts"].tolist() == [1, 1, 0, 1, 1, 0]
    for row, item in enumerate(items):
        n, m = len(item["input_ids"]), len(item["rejected_input_ids"])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()
        assert batch["input_ids"][3 + row, :m].tolist() == item["rejected_input_ids"].tolist()
        # Same prompt, different answers: the labels cover each answer only.
        chosen = tokenizer.decode([t for t in item["labels"].tolist() if t >= 0], skip_special_tokens=True)
        rejected = tokenizer.decode([t for t in item["rejected_labels"].tolist() if t >= 0], skip_special_tokens=True)
        assert (chosen.strip(), rejected.strip()) == (records[row]["chosen"], records[row]["rejected"])
    # the image spans sit in the same places in both halves
    image_id = image_tokens.image_id
    for row in range(3):
        assert ((batch["input_ids"][row] == image_id).sum() == (batch["input_ids"][3 + row] == image_id).sum())


def test_a_pair_whose_longer_half_is_over_length_is_dropped_whole(tmp_path, tokenizer, image_tokens, image_processor):
    long = {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "yes", "rejected": " ".join(["word"] * 200)}
    short = {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "yes", "rejected": "no"}
    args = DataArguments(dataset_names=[_pairs(tmp_path, [long, short])], eval_ratio=0.0, max_seq_len=64, overlength_policy="truncate_turns")
    data = build_datasets(args, tokenizer, image_processor, image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    assert len(data.train) == 1 and data.report["dropped_overlength_train"] == 1


THREE_PAIRS = [
    LAYOUTS["llava"],
    {"image": "blue.png", "conversations": [{"from": "human", "value": "<image>\nWhich?"}], "chosen": "blue sky", "rejected": "red"},
    {"conversations": [{"from": "human", "value": "No image here?"}], "chosen": "yes", "rejected": "no it is not"},
]


def test_under_a_token_budget_pairs_count_both_halves_and_pack_into_one_row_chosen_then_rejected(tmp_path, tokenizer, image_tokens, image_processor):
    args = DataArguments(dataset_names=[_pairs(tmp_path, THREE_PAIRS)], eval_ratio=0.0, max_tokens_per_batch=512)
    data = build_datasets(args, tokenizer, image_processor, image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    items = [data.train[i] for i in range(3)]
    halves = [len(i["input_ids"]) for i in items] + [len(i["rejected_input_ids"]) for i in items]
    assert data.train.item_sizes() == [(halves[k] + halves[3 + k], n) for k, n in enumerate((1, 1, 0))]
    batch = PairPackingCollator(tokenizer.pad_token_id, 512)(items)
    assert batch["input_ids"].shape == (1, sum(halves)) and pairs_in(batch) == 3 and batch["num_samples"] == 6
    assert batch["image_repeats"] == 2 and batch["pixel_values"].shape[0] == 2
    # chosen answers, then rejected ones, each its own document, in pair order
    row, start = batch["input_ids"][0], 0
    for k, sample in enumerate([i["input_ids"] for i in items] + [i["rejected_input_ids"] for i in items]):
        assert row[start:start + len(sample)].tolist() == sample.tolist()
        assert set(batch["document_ids"][0, start:start + len(sample)].tolist()) == {k}
        start += len(sample)
    # every target is owned by its sample: the answers' labels, sample by sample
    targets = batch["labels"][:, 1:].reshape(-1).index_select(0, batch["label_positions"])
    for k, item in enumerate(items):
        for sample, labels in ((k, item["labels"]), (3 + k, item["rejected_labels"])):
            assert targets[batch["label_samples"] == sample].tolist() == [t for t in labels[1:].tolist() if t >= 0]
    with pytest.raises(ValueError, match="do not fit one packed row of 64"):
        PairPackingCollator(tokenizer.pad_token_id, 64)(items)


def test_a_pair_whose_two_halves_together_exceed_the_token_budget_is_dropped_whole(tmp_path, tokenizer, image_tokens, image_processor):
    records = [{"conversations": [{"from": "human", "value": "Q?"}], "chosen": " ".join(["yes"] * 20), "rejected": " ".join(["no"] * 20)}, THREE_PAIRS[2]]
    args = DataArguments(dataset_names=[_pairs(tmp_path, records)], eval_ratio=0.0, max_tokens_per_batch=48, max_seq_len=48)
    data = build_datasets(args, tokenizer, image_processor, image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    assert len(data.train) == 1 and data.report["dropped_overlength_train"] == 1
    unbudgeted = DataArguments(dataset_names=args.dataset_names, eval_ratio=0.0, max_seq_len=48)
    kept = build_datasets(unbudgeted, tokenizer, image_processor, image_tokens, sources=read_sources(unbudgeted, pairs=True), pairs=True)
    assert len(kept.train) == 2  # each half fits 48 tokens alone; both together do not


def test_trl_pairs_in_parquet_with_embedded_images_are_items(tmp_path, tokenizer, image_tokens, image_processor):
    """TRL's vision DPO layout as the Hub keeps it: prompt/chosen/rejected messages and a ``datasets.Image`` list, in Parquet."""
    import datasets

    from tests.hub_data import COLORS, png_bytes

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = datasets.List({"role": datasets.Value("string"), "content": datasets.List(part)})
    features = datasets.Features({"prompt": message, "chosen": message, "rejected": message, "images": datasets.List(datasets.Image())})
    names = ["red", "green", "blue", "red"]
    data = {
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour?"}]}] for _ in names],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": n}]}] for n in names],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "green" if n != "green" else "red"}]}] for n in names],
        "images": [[{"bytes": png_bytes(COLORS[n]), "path": None}] for n in names],
    }
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    args = DataArguments(dataset_names=[str(path)], eval_ratio=0.0)
    data = build_datasets(args, tokenizer, image_processor, image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    items = [data.train[i] for i in range(len(data.train))]
    assert len(items) == 4
    # each pair's own embedded image, decoded: the red one's first pixel is red, the blue one's blue
    by_answer = {tokenizer.decode([t for t in i["labels"].tolist() if t >= 0], skip_special_tokens=True).strip(): i for i in items}
    red, blue = by_answer["red"]["pixel_values"][0, :, 0, 0], by_answer["blue"]["pixel_values"][0, :, 0, 0]
    assert red[0] > red[2] and blue[2] > blue[0]
    batch = PairCollator(tokenizer.pad_token_id)(items)
    assert pairs_in(batch) == 4 and batch["pixel_values"].shape[0] == 4


def test_a_stream_checks_each_record_is_of_its_objectives_kind(tmp_path, tokenizer, image_tokens, image_processor):
    """A streamed record is read only when training reaches it: the wrong kind then stops the run naming shard and record."""
    import json

    pair = {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "yes", "rejected": "no"}
    talk = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "yes"}]}
    for name, record in (("pairs", pair), ("talk", talk)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    for shard, other, pairs, message in (
        ("pairs", "talk", False, "is a preference pair"), ("talk", "pairs", True, "is a conversation, not a preference pair"),
    ):
        args = DataArguments(dataset_names=[str(tmp_path / f"{shard}.jsonl")], eval_dataset_names=[str(tmp_path / f"{other}.jsonl")], streaming=True)
        data = build_datasets(args, tokenizer, image_processor, image_tokens, sources=read_sources(args, pairs=pairs), pairs=pairs)
        data.train.start()
        with pytest.raises(DataError, match=rf"{shard}.jsonl: record 0 {message}"):
            data.train.next_item()
