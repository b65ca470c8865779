"""A checkpoint's host memory on GPUs: the main process copies one tensor at a time to the host, the others none.

Runs ``benchmarks/checkpoint_memory.py`` as a user would. The 7B measurement (one H200,
``--lm_training full``) is the benchmark's own command, in its docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

FULL_TINY_LM = ["--lm_training", "full", "--lang_lora_dim", "0"]


def _benchmark(tmp_path, *flags: str) -> dict:
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "benchmarks/checkpoint_memory.py", "--out", str(out), *flags], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_portable_state_is_copied_to_the_host_one_tensor_at_a_time(tmp_path):
    result = _benchmark(tmp_path, "--portable_only", "--zero_stage", "2", "--sink", "/dev/null", "--", *FULL_TINY_LM)
    largest = result["portable_state"]["largest_tensor_bytes"]
    # from the GPU every tensor is copied, and only one is held: the largest is the peak
    assert result["per_rank"]["portable_state_host_copy_peak"] == [largest]
    assert result["per_rank"]["portable_state_rss_growth"][0] < result["portable_state"]["bytes"] / 4


@pytest.mark.gpus(2)
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_two_gpu_checkpoint_copies_nothing_to_the_host_beside_the_main_process(tmp_path, config):
    result = _benchmark(tmp_path, "--config_file", f"accelerate_configs/{config}", "--num_processes", "2", "--", *FULL_TINY_LM)
    largest = result["portable_state"]["largest_tensor_bytes"]
    assert result["per_rank"]["portable_state_host_copy_peak"] == [largest, 0]
    assert all(g < result["portable_state"]["bytes"] / 4 for g in result["per_rank"]["portable_state_rss_growth"])
