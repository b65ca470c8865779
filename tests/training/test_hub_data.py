"""Hub-shaped data through the real entry point: a Parquet file and a cached Hub name with embedded images train and evaluate."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from tests.hub_data import cache_as_hub_dataset, vqa_dataset

from .conftest import common_flags, metrics


@pytest.fixture
def train(monkeypatch, model_folders, data_path):
    """train(output_dir, dataset, **flags) -> ``mmtrain.train.main``'s result, in this process."""
    from accelerate.state import AcceleratorState, GradientState

    from mmtrain.train import main

    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    def run(out, dataset, *extra, **flags):
        argv = common_flags(
            model_folders, data_path, output_dir=out, max_steps=4, per_device_train_batch_size=4, eval_generate=2,
            export_each_epoch="false", **flags,
        )
        try:
            return main(argv + ["--dataset_names", dataset, *extra])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()

    return run


def _assert_trained_and_evaluated(out, caplog, source: str, steps: int = 4) -> None:
    (report,) = [json.loads(r.getMessage()[len("data: "):]) for r in caplog.records if r.getMessage().startswith("data: ")]
    assert list(report["sources"]) == [source] and report["train_samples"] == 36 and report["eval_samples"] == 4
    records = metrics(out)
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == steps and all(math.isfinite(v) and v > 0 for v in losses)
    (evaluation,) = [r for r in records if r["split"] == "eval"]
    assert math.isfinite(evaluation["loss"]) and evaluation["questions"] == 2  # generation read embedded images too


@pytest.mark.slow
def test_a_hub_format_parquet_with_embedded_images_trains(train, tmp_path, caplog):
    vqa_dataset(40).to_parquet(str(tmp_path / "colours.parquet"))
    caplog.set_level(logging.INFO)
    train(tmp_path / "run", str(tmp_path / "colours.parquet"))
    _assert_trained_and_evaluated(tmp_path / "run", caplog, str(tmp_path / "colours.parquet"))


@pytest.mark.slow
def test_a_cached_hub_dataset_in_another_layout_trains_by_name(train, tmp_path, monkeypatch, caplog):
    from tests.hub_data import MAPPED_COLUMNS

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    cache_as_hub_dataset(vqa_dataset(40, "mapped"), "someone/colour-vqa", tmp_path / "cache")
    train(tmp_path / "run", "someone/colour-vqa", "--dataset_columns", *MAPPED_COLUMNS)
    _assert_trained_and_evaluated(tmp_path / "run", caplog, "someone/colour-vqa [train]")


def test_a_hub_name_that_is_not_cached_stops_the_run_naming_it(train, tmp_path, monkeypatch):
    from mmtrain.data import DataError

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="--dataset_names 'someone/not-cached' is not a file, a folder or a registered dataset"):
        train(tmp_path / "run", "someone/not-cached")
