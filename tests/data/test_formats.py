"""Each input format becomes the same canonical record."""

import os

from mmtrain.data import load_records


def test_llava_json_with_image_string(tmp_path, mk):
    mk.solid(tmp_path / "a.png", "red")
    path = mk.json(tmp_path / "d.json", [mk.llava("<image>\nWhat color?", "red", image="a.png")])
    (record,) = load_records(path)
    assert record["turns"] == [{"role": "user", "text": "<image>\nWhat color?"}, {"role": "assistant", "text": "red"}]
    assert record["images"] == [os.path.join(str(tmp_path), "a.png")]
    assert record["source"] == path and record["index"] == 0


def test_llava_jsonl_with_images_list_and_aliases(tmp_path, mk):
    records = [
        {
            "images": ["x.png", "y.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "user", "value": "<image> and <image>?"},
                {"from": "assistant", "value": "same"},
            ],
        },
        mk.llava("Text only?", "yes"),
    ]
    path = mk.json(tmp_path / "d.jsonl", records, jsonl=True)
    first, second = load_records(path, image_folder="/imgs")
    assert [t["role"] for t in first["turns"]] == ["system", "user", "assistant"]
    assert first["images"] == ["/imgs/x.png", "/imgs/y.png"]
    assert second["images"] == [] and second["index"] == 1


def test_images_without_placeholders_go_before_first_question(tmp_path, mk):
    path = mk.json(tmp_path / "d.json", [mk.llava("Which?", "first", images=["a.png", "b.png"], more=[("Sure?", "yes")])])
    (record,) = load_records(path)
    assert record["turns"][0]["text"] == "<image>\n<image>\nWhich?"
    assert "<image>" not in record["turns"][2]["text"]


def test_messages_with_string_and_part_contents(tmp_path, mk):
    records = [
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "<image>\nWhat color?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["a.png"],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "first"}]},
            ],
            "images": ["a.png", "b.png"],
        },
    ]
    path = mk.json(tmp_path / "m.jsonl", records, jsonl=True)
    first, second = load_records(path)
    assert first["turns"][0] == {"role": "system", "text": "sys"}
    assert second["turns"][0]["text"] == "<image>\nCompare\n<image>"
    assert second["turns"][1] == {"role": "assistant", "text": "first"}
    assert len(second["images"]) == 2
