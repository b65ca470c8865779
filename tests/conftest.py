"""Shared fixtures: tiny models written as real Hugging Face folders.

Everything loads through ``from_pretrained`` from these folders, exactly as a user's
7B checkpoint would; nothing is mocked and nothing is downloaded.
"""

import os
import subprocess
import sys
from pathlib import Path

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


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state (private API, tests only), so that the next
    Accelerator or in-process run starts as a fresh process would."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def accelerator():
    """A single-process CPU Accelerator; its process-wide state is reset afterwards."""
    from accelerate import Accelerator

    yield Accelerator(cpu=True)
    reset_accelerate_state()


@pytest.fixture
def run_main(monkeypatch):
    """``run_main(argv)`` -> ``mmtrain.train.main(argv)`` in this process (one process; DeepSpeed's
    CPU accelerator where there is no GPU), Accelerate's state reset after each run."""
    import torch

    from mmtrain.train import main

    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    def run(argv):
        try:
            return main(argv)
        finally:
            reset_accelerate_state()

    return run


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The embedded default, run once per session as a new user runs it: ``python -m mmtrain.train``, no flags, an empty folder.

    Returns ``(folder it ran in, the finished process)``. Its own test checks what it
    learned; the DPO recipe's test starts from its last checkpoint, as the recipe does.
    """
    folder = tmp_path_factory.mktemp("default-run")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train"], cwd=folder, env=env, capture_output=True, text=True, timeout=1500)
    return folder, proc
