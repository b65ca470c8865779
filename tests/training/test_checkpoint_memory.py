"""A checkpoint of a two-process ZeRO-2 run: only the main process holds a host copy of the trainable state, one tensor at a time.

The run trains a whole LM of about 14 M parameters (``--lm_training full``), so its
portable state (about 170 MB of fp32 values and Adam moments) stands far above the
resident-set noise of a save. Each process measures its own resident-set growth while it
saves (``host_memory`` in the manifest); the benchmark that reads it
(``benchmarks/checkpoint_memory.py``) runs here as a user would run it.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys

import pytest

from .conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow


def _benchmark():
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("checkpoint_memory")


@pytest.fixture(scope="module")
def wide_lm(model_folders, tmp_path_factory):
    """The tiny LM's tokenizer with a wider model: 4 layers of hidden 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide") / "wide-llama"
    shutil.copytree(model_folders["tiny-llama"], folder)
    config = LlamaConfig.from_pretrained(folder)
    config.update(dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8))
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_only_the_main_process_holds_the_portable_state_and_one_tensor_at_a_time(wide_lm, model_folders, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "result.json"
    result = _benchmark().main([
        "--config_file", str(CONFIGS / "zero2.yaml"), "--num_processes", "2", "--seq_len", "128", "--out", str(out), "--",
        "--lm_model_name_or_path", str(wide_lm), "--vision_model_name_or_path", model_folders["tiny-clip"],
        "--lm_training", "full", "--lang_lora_dim", "0",
    ])
    assert json.loads(out.read_text())["per_rank"] == result["per_rank"]
    state = result["portable_state"]["bytes"]
    largest = result["portable_state"]["largest_tensor_bytes"]
    assert state > 100 * 2**20 and largest < state / 40  # a large state of many tensors
    per_rank = result["per_rank"]
    # DeepSpeed gathers each tensor into a new buffer on both processes (on the host, on a CPU run);
    # the main one writes it and both let it go before the next
    assert 0 < per_rank["portable_state_host_copy_peak"][0] <= largest
    assert 0 < per_rank["portable_state_host_copy_peak"][1] <= largest
    # measured: neither process's resident set grew by more than a few tensors while saving,
    # where holding the state whole would have added all of it
    for rank in (0, 1):
        assert per_rank["portable_state_rss_growth"][rank] < state / 10, (rank, per_rank)
        assert per_rank["save_rss_growth"][rank] < state / 10, (rank, per_rank)
    assert result["zero_stage"] == 2 and result["checkpoint_bytes_on_disk"] > state
    assert result["predicted"]["checkpoint_host"] >= largest
    assert result["command"][:2] == ["python", "benchmarks/checkpoint_memory.py"]
    assert any("<output_dir>" in part for part in result["trainer_command"])
