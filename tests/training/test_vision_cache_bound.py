"""An in-memory vision-feature cache its images would outgrow is refused at start, before any weights load."""

from __future__ import annotations

import re
import shutil

import pytest

from mmtrain.args import ConfigError

from .conftest import common_flags


def test_in_memory_cache_over_its_bound_is_refused_before_weights_load(run_main, model_folders, data_path, tmp_path):
    lm = tmp_path / "lm-without-weights"  # a run that reached the weights would fail on them, not with this message
    shutil.copytree(model_folders["tiny-llama"], lm)
    for weights in lm.glob("*.safetensors"):
        weights.unlink()
    flags = common_flags(model_folders, data_path, output_dir=tmp_path / "o", lm_model_name_or_path=lm, cache_vision_features="true")
    with pytest.raises(ConfigError) as refused:
        run_main([*flags, "--vision_cache_max_gb", "0.0001"])
    message = str(refused.value)
    assert re.search(r"--cache_vision_features would keep \d+ images x [\d.]+ MB = [\d.]+ MB of features", message), message
    assert "--vision_cache_max_gb 0.0001 (0.10 MB)" in message
    assert "--vision_cache_dir" in message
    # on disk there is no bound: the same flags get past the check and stop at the missing weights
    with pytest.raises(Exception) as past_the_check:
        run_main([*flags, "--vision_cache_max_gb", "0.0001", "--vision_cache_dir", "features"])
    assert "--cache_vision_features would keep" not in str(past_the_check.value)


def test_vision_cache_bound_must_be_positive():
    from mmtrain.args import ModelArguments

    with pytest.raises(ConfigError, match="--vision_cache_max_gb must be > 0"):
        ModelArguments(cache_vision_features=True, vision_cache_max_gb=0)
