"""Fixtures of the data tests: the preset tokenizer with image tokens, the 64 px processor, file writers."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from mmtrain import presets
from mmtrain.args import DataArguments
from mmtrain.model.tokens import add_image_tokens

# Short image spans keep the test sequences readable; the length logic does not care.
PER_IMAGE = 4


@pytest.fixture(scope="session")
def _base_tokenizer():
    tokenizer = presets.build_preset_tokenizer()
    image_tokens = add_image_tokens(tokenizer, PER_IMAGE)
    return tokenizer, image_tokens


@pytest.fixture
def tokenizer(_base_tokenizer):
    # A copy per test: some tests give it a chat template.
    return copy.deepcopy(_base_tokenizer[0])


@pytest.fixture
def image_tokens(_base_tokenizer):
    return _base_tokenizer[1]


@pytest.fixture(scope="session")
def image_processor():
    return presets.build_preset_image_processor(presets.preset_config("tiny-clip"))


def save_solid(path, color, size=(32, 32)):
    """A solid-colour PNG: its processed pixels identify which image landed where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.name


def write_json(path, records, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if jsonl:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        else:
            json.dump(records, f)
    return str(path)


def llava(question, answer, image=None, images=None, more=()):
    """A LLaVA record; ``more`` adds (question, answer) turns."""
    conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for q, a in more:
        conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    record = {"conversations": conversations}
    if image is not None:
        record["image"] = image
    if images is not None:
        record["images"] = images
    return record


def data_args(paths, **kw):
    kw.setdefault("eval_ratio", 0.0)
    return DataArguments(dataset_names=list(paths), **kw)


@pytest.fixture
def build(tokenizer, image_processor, image_tokens):
    """build(paths, **data_flags) -> DataBundle with the test tokenizer and processor."""
    from mmtrain.data import build_datasets

    def run(paths, seed=0, **kw):
        return build_datasets(data_args(paths, **kw), tokenizer, image_processor, image_tokens, seed=seed)

    return run


@pytest.fixture
def mk():
    """Helpers to write test files: ``mk.solid``, ``mk.json``, ``mk.llava``, ``mk.args``."""
    import types

    return types.SimpleNamespace(solid=save_solid, json=write_json, llava=llava, args=data_args)
