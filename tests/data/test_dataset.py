"""The Dataset: image order, length policy, concatenation, subsets, splits, collation."""

import numpy as np
import pytest
import torch

from mmtrain.data import IGNORE_INDEX, Collator, DataError

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def dominant(pixels):
    """Name of the solid colour an image was made of, from its normalised pixels."""
    means = pixels.mean(dim=(1, 2))
    if means.min() > 1.0:
        return "white"
    return ("red", "green", "blue")[int(means.argmax())]


def test_images_follow_placeholder_order(tmp_path, mk, build, image_tokens):
    for name in ("blue", "red", "green"):
        mk.solid(tmp_path / f"{name}.png", COLORS[name])
    record = {
        "images": ["green.png", "blue.png", "red.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nFirst two?"},
            {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "Then <image>?"},
            {"from": "gpt", "value": "fine"},
        ],
    }
    bundle = build([mk.json(tmp_path / "d.json", [record])])
    item = bundle.train[0]
    assert [dominant(p) for p in item["pixel_values"]] == ["green", "blue", "red"]
    # And the spans sit in the order the model fills them: all three present, whole.
    assert (item["input_ids"] == image_tokens.start_id).sum() == 3
    assert not (item["labels"] == image_tokens.image_id).any()


def test_text_only_and_image_samples_collate(tmp_path, mk, build, tokenizer):
    mk.solid(tmp_path / "a.png", COLORS["red"])
    records = [mk.llava("What is two plus two?", "four"), mk.llava("<image>\nColor?", "red", image="a.png")]
    bundle = build([mk.json(tmp_path / "d.json", records)])
    batch = Collator(tokenizer.pad_token_id)([bundle.train[0], bundle.train[1]])
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    assert batch["image_counts"].tolist() == [0, 1]
    short = len(bundle.train[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    text_only = Collator(tokenizer.pad_token_id)([bundle.train[0]])
    assert text_only["pixel_values"].shape == (0, 3, 64, 64) and text_only["image_counts"].tolist() == [0]
    assert bundle.report["text_only_train"] == 1


def long_records(tmp_path, mk):
    """Three records whose turns carry images, sized against PER_IMAGE=4 spans."""
    for name in ("red", "green", "blue"):
        mk.solid(tmp_path / f"{name}.png", COLORS[name])
    multi = {
        "images": ["red.png", "green.png", "blue.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nColor?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "<image>\nAnd?"},
            {"from": "gpt", "value": "green"},
            {"from": "human", "value": "<image>\nLast?"},
            {"from": "gpt", "value": "blue"},
        ],
    }
    short = mk.llava("<image>\nColor?", "red", image="red.png")
    too_long = mk.llava("word " * 80, "yes")
    return mk.json(tmp_path / "d.json", [multi, short, too_long])


def test_drop_policy_counts_over_length(tmp_path, mk, build):
    path = long_records(tmp_path, mk)
    bundle = build([path], max_seq_len=40)
    assert bundle.report["dropped_overlength_train"] == 2
    assert bundle.report["train_samples"] == 1
    assert all(len(bundle.train[i]["input_ids"]) <= 40 for i in range(len(bundle.train)))


def test_truncate_turns_keeps_whole_turns_and_their_images(tmp_path, mk, build, tokenizer, image_tokens):
    path = long_records(tmp_path, mk)
    bundle = build([path], max_seq_len=60, overlength_policy="truncate_turns")
    report = bundle.report
    assert report["truncated_train"] == 1 and report["dropped_overlength_train"] == 1
    item = bundle.train[0]
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) <= 60
    kept_images = item["pixel_values"].shape[0]
    assert 1 <= kept_images < 3
    # Every image span is whole, and one span per kept image.
    assert (ids == image_tokens.start_id).sum() == (ids == image_tokens.end_id).sum() == kept_images
    assert (ids == image_tokens.image_id).sum() == kept_images * image_tokens.per_image
    answers = ["red</s>", "red</s>green</s>"][kept_images - 1]
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == answers
    assert ids[-1] == tokenizer.eos_token_id


def test_concatenation_renumbers_and_reshuffles_per_epoch(tmp_path, mk, build, tokenizer, image_tokens):
    names = ["red", "green", "blue", "white"]
    records = []
    for name in names:
        mk.solid(tmp_path / f"{name}.png", COLORS[name])
        records.append(mk.llava("<image>\nColor?", name, image=f"{name}.png"))
    records += [mk.llava(f"Text {i}?", "no") for i in range(4)]
    path = mk.json(tmp_path / "d.json", records)
    bundle = build([path], seed=3, dataset_concatenate_samples=3, max_num_image_per_sample=2)
    train = bundle.train
    groups = [train.group(i) for i in range(len(train))]
    assert sorted(e for g in groups for e in g) == list(range(8))  # every sample once
    assert any(len(g) > 1 for g in groups)
    for i in range(len(train)):
        item = train[i]
        text = tokenizer.decode(item["input_ids"][item["input_ids"] != image_tokens.image_id])
        n = item["pixel_values"].shape[0]
        assert n <= 2
        headers = [f"### Image {k}:" for k in range(1, n + 1)]
        assert [h for h in headers if h in text] == headers and f"### Image {n + 1}:" not in text
        assert text.count("<s>") == 1
        # Image k's colour is the answer of the k-th image question: order survives the join.
        answers = tokenizer.decode(item["input_ids"][item["labels"] != IGNORE_INDEX]).split("</s>")[:-1]
        image_answers = [a for a in answers if a in names]
        assert [dominant(p) for p in item["pixel_values"]] == image_answers
    epoch0 = groups
    train.set_epoch(1)
    epoch1 = [train.group(i) for i in range(len(train))]
    assert epoch1 != epoch0
    assert sorted(e for g in epoch1 for e in g) == list(range(8))  # every sample once again: none cut, none twice
    train.set_epoch(0)
    assert [train.group(i) for i in range(len(train))] == epoch0
    assert len(bundle.eval) == 0 or all(len(bundle.eval.group(i)) == 1 for i in range(len(bundle.eval)))


def test_split_and_subset_are_deterministic(tmp_path, mk, build):
    path = mk.json(tmp_path / "d.json", [mk.llava(f"Question {i}?", f"a{i}") for i in range(50)])

    def answers(dataset):
        return sorted(r["turns"][-1]["text"] for r in dataset.records) if len(dataset) else []

    a = build([path], seed=1, eval_ratio=0.2, dataset_samples=["30"])
    b = build([path], seed=1, eval_ratio=0.2, dataset_samples=["30"])
    c = build([path], seed=2, eval_ratio=0.2, dataset_samples=["30"])
    assert (len(a.train), len(a.eval)) == (24, 6)
    assert answers(a.train) == answers(b.train) and answers(a.eval) == answers(b.eval)
    assert answers(a.eval) != answers(c.eval)
    assert not set(answers(a.train)) & set(answers(a.eval))
    assert a.report["sources"][path] == {"records": 50, "selected": 30, "requested": 30, "train": 24, "eval": 6}
    examples = a.generation_examples(3)
    assert [e["answer"] for e in examples] == [e["answer"] for e in b.generation_examples(3)]
    assert len(examples) == 3 and all(e["answer"] in answers(a.eval) for e in examples)


def test_several_files_with_image_folders_and_eval_file(tmp_path, mk, build):
    mk.solid(tmp_path / "imgs1" / "p.png", COLORS["red"])
    mk.solid(tmp_path / "imgs2" / "p.png", COLORS["blue"])
    one = mk.json(tmp_path / "one.json", [mk.llava("<image>\nC?", "red", image="p.png")])
    two = mk.json(tmp_path / "two.jsonl", [mk.llava("<image>\nC?", "blue", image="p.png")], jsonl=True)
    ev = mk.json(tmp_path / "imgs2" / "eval.json", [mk.llava("<image>\nC?", "blue", image="p.png")])
    bundle = build(
        [one, two], image_folder=[str(tmp_path / "imgs1"), str(tmp_path / "imgs2")], eval_dataset_names=[ev], eval_ratio=0.5
    )
    assert len(bundle.train) == 2 and len(bundle.eval) == 1
    assert [dominant(bundle.train[i]["pixel_values"][0]) for i in range(2)] == ["red", "blue"]
    assert dominant(bundle.eval[0]["pixel_values"][0]) == "blue"  # default folder: the eval file's own
    (example,) = bundle.generation_examples(5)
    assert example["answer"] == "blue" and example["pixel_values"].shape[0] == 1


def test_unknown_dataset_name(tmp_path, build):
    with pytest.raises(DataError, match="nope.json"):
        build([str(tmp_path / "nope.json")])


def test_items_work_through_a_dataloader_with_workers(tmp_path, mk, build, tokenizer):
    mk.solid(tmp_path / "a.png", COLORS["red"])
    records = [mk.llava("<image>\nC?", "red", image="a.png"), mk.llava("T?", "x")] * 4
    bundle = build([mk.json(tmp_path / "d.json", records)])
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=4, num_workers=2, collate_fn=Collator(tokenizer.pad_token_id))
    batches = list(loader)
    assert sum(int(b["image_counts"].sum()) for b in batches) == 4
    assert np.all([b["input_ids"].shape[0] == 4 for b in batches])


def test_persistent_workers_follow_set_epoch(tmp_path, mk, build, tokenizer):
    records = [mk.llava(f"Question {i}?", f"a{i}") for i in range(12)]
    bundle = build([mk.json(tmp_path / "d.json", records)], dataset_concatenate_samples=4)
    train = bundle.train
    loader = torch.utils.data.DataLoader(
        train, batch_size=12, num_workers=1, persistent_workers=True, collate_fn=Collator(tokenizer.pad_token_id)
    )
    for epoch in (0, 1):
        train.set_epoch(epoch)
        (batch,) = list(loader)
        local = Collator(tokenizer.pad_token_id)([train[i] for i in range(len(train))])
        assert torch.equal(batch["input_ids"], local["input_ids"])


def test_each_concatenated_epoch_has_its_own_length(tmp_path, mk, build):
    """Epochs join different runs of samples: each keeps its whole plan (none cut or wrapped to epoch 0's length)."""
    from torch.utils.data import DataLoader

    from mmtrain.training.setup import batches_per_epoch

    records = [mk.llava(f"Question {i}?", f"a{i}") for i in range(40)]
    train = build([mk.json(tmp_path / "d.json", records)], eval_ratio=0, dataset_concatenate_samples=4).train
    lengths = {}
    for epoch in range(6):
        train.set_epoch(epoch)
        groups = [train.group(i) for i in range(len(train))]
        assert sorted(e for g in groups for e in g) == list(range(40)), epoch  # every sample exactly once
        lengths[epoch] = len(train)
    assert len(set(lengths.values())) > 1, lengths  # the plans differ in length, and each epoch keeps its own
    assert [train.epoch_length(epoch) for epoch in range(6)] == [lengths[e] for e in range(6)]
    train.set_epoch(0)
    loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=list)
    assert batches_per_epoch(loader, 6) == [-(-lengths[e] // 4) for e in range(6)]
    assert train.epoch == 0 and len(train) == lengths[0]
