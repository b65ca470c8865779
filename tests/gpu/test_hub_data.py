"""The GPU tier's Hub-data row: Hub-format Parquet shards with embedded images, streamed, on one GPU.

The shards hold ``messages`` + ``images`` (``datasets.Image`` PNG bytes, no image file
anywhere), as the Hub's VLM datasets do. The row trains through ``accelerate launch``
with loader workers, checks that the loss falls, and that a run SIGKILLed after its
checkpoint and resumed follows the uninterrupted one step for step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gpu.test_tier import SAVE_AT, Interrupted, Row, assert_trained, launch, record  # noqa: F401 (record: a fixture)
from tests.hub_data import vqa_dataset, write_parquet_shards
from tests.training.conftest import common_flags, metrics


def _hub_shards(folder: Path) -> tuple[str, str]:
    """(train glob, eval file): 4 Parquet shards of 90 rows and a 40-row Parquet eval file."""
    train_glob = write_parquet_shards(folder, shards=4, per_shard=90)
    vqa_dataset(40, start=1000).to_parquet(str(folder / "eval.parquet"))
    return train_glob, str(folder / "eval.parquet")


def test_hub_parquet_streaming_workers_kill_and_resume(model_folders, data_path, tmp_path, record):  # noqa: F811
    r = Row("zero2", ("streaming", "hub_parquet", "workers"), export=False, resume=True)
    record(r)
    train_glob, eval_file = _hub_shards(tmp_path / "shards")

    def flags(out, **extra):
        base = common_flags(
            model_folders, data_path, output_dir=out, max_steps=24, save_steps=SAVE_AT, save_total_limit=4, eval_generate=4,
            export_each_epoch="false", per_device_train_batch_size=8, num_workers=2, pad_to_multiple_of=8, num_train_epochs=3,
            **extra,
        )
        return base + ["--streaming", "--shuffle_buffer_size", "32", "--dataset_names", train_glob, "--eval_dataset_names", eval_file]

    reference, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    interrupted = Interrupted(flags(out), out=out, config=r.config, processes=1, devices="0")  # beside the reference run
    try:
        launch(flags(reference), config=r.config, processes=1, out=reference, devices="0")
        losses = assert_trained(reference)
    except BaseException:
        interrupted.stop()
        raise
    launch(flags(out, resume_from_checkpoint=interrupted.checkpoint()), config=r.config, processes=1, out=out, devices="0")
    resumed = {m["step"]: m["loss"] for m in metrics(out) if m["split"] == "train" and m["step"] > SAVE_AT}
    assert max(resumed) == max(losses)
    for step in range(SAVE_AT + 1, max(losses) + 1):
        assert resumed[step] == pytest.approx(losses[step], rel=2e-2, abs=2e-2), f"step {step}: resumed {resumed[step]} vs {losses[step]}"
    saved = (out / "checkpoints" / f"step-{SAVE_AT:08d}" / "stream" / "rank-0.json").read_text()
    assert "embedded:" in saved and "PNG" not in saved  # the buffer holds where each image lies, not its bytes
