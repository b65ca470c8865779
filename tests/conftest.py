"""Shared fixtures: tiny models written as real Hugging Face folders.

Everything loads through ``from_pretrained`` from these folders, exactly as a user's
7B checkpoint would; nothing is mocked and nothing is downloaded.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mmtrain import presets  # noqa: E402


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory):
    """``{preset name: folder}`` for the tiny presets, written once per test session."""
    root = tmp_path_factory.mktemp("models")
    names = ("tiny-llama", "tiny-qwen2", "tiny-clip", "tiny-siglip")
    return {name: presets.materialize_preset(name, root / name) for name in names}


@pytest.fixture
def tiny_args(model_folders):
    """ModelArguments factory pointing at the tiny folders."""
    from mmtrain.args import ModelArguments

    def make(**overrides):
        values = dict(
            lm_model_name_or_path=model_folders["tiny-llama"],
            vision_model_name_or_path=model_folders["tiny-clip"],
            lang_lora_dim=0,  # tests add adapters where they test them
        )
        values.update(overrides)
        return ModelArguments(**values)

    return make
