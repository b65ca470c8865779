"""Every kind of bad input stops with a message naming the file and the record."""

import pytest

from mmtrain.data import DataError, load_records

GOOD = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]}

STRUCTURAL = {
    "no conversations": ({"id": 1}, "no 'conversations'"),
    "empty conversation": ({"conversations": []}, "conversation is empty"),
    "unknown role": ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "A"}]}, "unknown role 'robot'"),
    "last turn not an answer": (
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2?"}]},
        "last turn is a question",
    ),
    "two questions in a row": (
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "human", "value": "A"}]},
        "expected a assistant turn",
    ),
    "more placeholders than images": (
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>Q?"}, {"from": "gpt", "value": "A"}]},
        "2 <image> placeholders but 1 images",
    ),
    "placeholders without images": (
        {"conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "A"}]},
        "1 <image> placeholders but 0 images",
    ),
    "placeholder in an answer": (
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>Q?"}, {"from": "gpt", "value": "<image>"}]},
        "only allowed in user turns",
    ),
    "non-string value": ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "A"}]}, "must be a string"),
    "bad content part": (
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "A"}]},
        "unknown content part type 'audio'",
    ),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURAL))
def test_structural_errors_name_file_and_record(tmp_path, mk, kind):
    bad, message = STRUCTURAL[kind]
    path = mk.json(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD], jsonl=True)
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}: record 2")
    assert message in str(err.value)


def test_unreadable_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": [')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_records(str(broken))
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match=r"broken.jsonl: record 2 \(line 3\) is not valid JSON"):
        load_records(str(lines))
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.json"):
        load_records(str(empty))
    with pytest.raises(DataError, match="missing.json: no such file"):
        load_records(str(tmp_path / "missing.json"))


def test_structural_errors_stop_build_before_training(tmp_path, mk, build):
    path = mk.json(tmp_path / "d.json", [GOOD, STRUCTURAL["unknown role"][0]])
    with pytest.raises(DataError, match="record 1"):
        build([path])


def bad_image_file(tmp_path, mk):
    """Records 1 (missing file) and 3 (corrupt file) have bad images; 0, 2, 4 are fine."""
    mk.solid(tmp_path / "ok.png", (255, 0, 0))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    records = [
        mk.llava("<image>\nQ0?", "a0", image="ok.png"),
        mk.llava("<image>\nQ1?", "a1", image="missing.png"),
        mk.llava("<image>\nQ2?", "a2", image="ok.png"),
        mk.llava("<image>\nQ3?", "a3", image="corrupt.png"),
        mk.llava("Q4?", "a4"),
    ]
    return mk.json(tmp_path / "d.json", records)


def test_missing_images_stop_the_build_naming_file_and_record(tmp_path, mk, build):
    path = bad_image_file(tmp_path, mk)
    with pytest.raises(DataError, match=r"1 record\(s\) name image files that do not exist \(1 file\(s\)\): .*d.json record 1: .*missing.png") as err:
        build([path])  # every path looked up when the records are read, before any sample is
    assert "--on_bad_sample skip" in str(err.value)


def test_many_missing_images_are_counted_and_the_first_named(tmp_path, mk, build):
    mk.solid(tmp_path / "ok.png", (255, 0, 0))
    records = [mk.llava("<image>\nQ?", "a", image=f"gone-{i}.png" if i % 2 else "ok.png") for i in range(20)]
    with pytest.raises(DataError, match=r"10 record\(s\) name image files that do not exist \(10 file\(s\)\): .*record 1: .*gone-1.png.*\(and 5 more\)"):
        build([mk.json(tmp_path / "d.json", records)])


def test_unreadable_images_raise_when_read(tmp_path, mk, build):
    path = bad_image_file(tmp_path, mk)
    (tmp_path / "missing.png").write_bytes((tmp_path / "ok.png").read_bytes())  # exists at the check
    bundle = build([path])
    bundle.train[0]
    (tmp_path / "missing.png").unlink()  # gone by the time it is read
    with pytest.raises(DataError, match=r"d.json: record 1: image file .*missing.png not found"):
        bundle.train[1]
    with pytest.raises(DataError, match=r"d.json: record 3: image file .*corrupt.png cannot be decoded"):
        bundle.train[3]


def test_bad_images_skipped_and_counted(tmp_path, mk, build, tokenizer):
    path = bad_image_file(tmp_path, mk)
    bundle = build([path], on_bad_sample="skip")
    # The record with a missing file is left out when the records are read ...
    assert bundle.report["missing_image_records"] == 1 and bundle.report["missing_image_files"] == 1
    assert bundle.report["train_samples"] == 4
    # ... the corrupt one is found when read and dropped: nothing takes its place, no sample is seen twice.
    items = [bundle.train[i] for i in range(4)]
    assert items[2] is None
    answers = [tokenizer.decode(item["labels"][item["labels"] != -100]) for item in items if item is not None]
    assert answers == ["a0</s>", "a2</s>", "a4</s>"]
    assert bundle.report["skipped_bad_samples"] == 1  # one per dropped read


def test_a_batch_loses_its_dropped_items(tmp_path, mk, build, tokenizer):
    """The trainer's loaders collate a batch without its dropped item; a batch of only dropped items is a placeholder."""
    from mmtrain.data import Collator
    from mmtrain.training.setup import make_loader

    path = bad_image_file(tmp_path, mk)
    train = build([path], on_bad_sample="skip").train
    loader = make_loader(train, Collator(tokenizer.pad_token_id), 4, 0, shuffle=False, seed=0)
    (batch,) = list(loader)
    assert batch["input_ids"].shape[0] == 3  # four planned, the corrupt one dropped
    # a batch of the corrupt item alone: one token, nothing to learn, so every process still steps
    placeholder = make_loader(train, Collator(tokenizer.pad_token_id), 1, 0, shuffle=False, seed=0).collate_fn([train[2]])
    assert placeholder["input_ids"].shape == (1, 1) and (placeholder["labels"] == -100).all()
    assert placeholder["pixel_values"].shape[0] == 0
