"""The GPU tier's fused-encoder row: DINOv2 + SigLIP features concatenated per patch, trained on one GPU.

Like the tier's rows (tests/gpu/test_tier.py), a real ``accelerate launch`` on tiny towers
written as Hugging Face folders: the loss must fall, and the epoch's export (two vision
folders) reloads and gives the eval loss training logged.
"""

from __future__ import annotations

import dataclasses

import pytest

from mmtrain import presets
from tests.gpu.test_tier import Row, assert_export_reproduces_training, assert_trained, launch, record, row_flags  # noqa: F401

FUSED = Row("zero2", ("fused_dinov2_siglip",))  # its flags name folders written in the test


@pytest.mark.parametrize("r", [pytest.param(FUSED, id=FUSED.name)])
def test_fused_dinov2_siglip_trains_and_its_export_reloads(r, model_folders, data_path, tmp_path, record):  # noqa: F811
    dinov2 = presets.materialize_preset("tiny-dinov2", tmp_path / "dinov2")
    r = dataclasses.replace(r, flags={"vision_model_name_or_path": dinov2, "vision_model_name_or_path_2": model_folders["tiny-siglip"]})
    record(r)
    out = tmp_path / "run"
    launch(row_flags(model_folders, data_path, out, r), out=out, **r.launch_options())
    assert_trained(out)
    folder = assert_export_reproduces_training(out, r)
    assert (folder / "vision_encoder_2" / "config.json").is_file()
