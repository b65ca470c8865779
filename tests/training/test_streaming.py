"""``--streaming`` through the real entry point: exact resume on one and two processes, refused flags, flat memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmtrain.args import ConfigError, parse_args
from mmtrain.data.synthetic import generate_synthetic

from .conftest import REPO, common_flags, kill_after_checkpoint, launch, train_losses

STEPS = 8
SAVE_EVERY = 4  # inside epoch 0 on one process, inside epoch 1 on two
SHARDS = 4
PER_SHARD = 3  # 12 records: an epoch is 6 steps of 2 on one process, 3 on each of two


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Synthetic records in 4 JSONL shards beside their images, and an eval file."""
    folder = Path(generate_synthetic(str(tmp_path_factory.mktemp("stream") / "synthetic"), SHARDS * PER_SHARD + 8, seed=1)).parent
    records = json.loads((folder / "train.json").read_text())
    for s in range(SHARDS):
        lines = [json.dumps(r) for r in records[s * PER_SHARD : (s + 1) * PER_SHARD]]
        (folder / f"part-{s}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records[SHARDS * PER_SHARD :]) + "\n")
    return folder


def _flags(model_folders, shards: Path, out, **extra) -> list[str]:
    flags = common_flags(
        model_folders, shards, output_dir=out, max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=2,
        eval_generate=0, record_samples="true", export_each_epoch="false", num_train_epochs=3,
        save_total_limit=10, **extra,
    )
    return flags + ["--streaming", "--shuffle_buffer_size", "6", "--dataset_names", str(shards / "part-*.jsonl"),
                    "--eval_dataset_names", str(shards / "eval.jsonl")]


def _samples(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((out / "samples").glob("rank-*.jsonl"))}


@pytest.mark.slow
@pytest.mark.parametrize(("num_processes", "num_workers"), [(1, 0), (2, 0), (1, 2)])
def test_killed_and_resumed_stream_trains_on_the_same_samples(model_folders, shards, tmp_path, num_processes, num_workers):
    workers = {"num_workers": num_workers}  # with workers, each reads half of the process's shards
    reference = tmp_path / "uninterrupted"
    launch(_flags(model_folders, shards, reference, **workers), config="zero0.yaml", num_processes=num_processes)
    out = tmp_path / "resumed"
    proc = launch(_flags(model_folders, shards, out, **workers), config="zero0.yaml", num_processes=num_processes, background=True)
    # Named, not "latest": a fast run may pass the epoch's end before the kill lands, and
    # a resume from there would not test the position inside an epoch.
    checkpoint = kill_after_checkpoint(proc, out, SAVE_EVERY)
    proc = launch(_flags(model_folders, shards, out, resume_from_checkpoint=checkpoint, **workers), config="zero0.yaml", num_processes=num_processes)
    assert f"step-{SAVE_EVERY:08d}: epoch {0 if num_processes == 1 else 1}, step {SAVE_EVERY}" in proc.stdout + proc.stderr

    expected, resumed = train_losses(reference), train_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]} != {expected[step]}"
    samples = _samples(reference)
    assert samples == _samples(out) and len(samples) == num_processes
    # ids are shard:record; every epoch covers every record once, each in its own order
    every_record = sorted(f"{shards / f'part-{s}.jsonl'}:{i}" for s in range(SHARDS) for i in range(PER_SHARD))
    epochs = [[i for lines in samples.values() for line in lines if line["epoch"] == e for i in line["indices"]] for e in (0, 1)]
    assert sorted(epochs[0]) == every_record
    assert len(set(epochs[1])) == len(epochs[1]) and epochs[1] != epochs[0][: len(epochs[1])]
    assert sum(1 for line in samples["rank-0.jsonl"] if line["epoch"] == 0) == SHARDS * PER_SHARD // (2 * num_processes)


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--max_tokens_per_batch", "512"], "--max_tokens_per_batch"),
        (["--packing", "true"], "--packing"),
        (["--dataset_concatenate_samples", "2"], "--dataset_concatenate_samples"),
        (["--dataset_samples", "10"], "--dataset_samples"),
        (["--cache_vision_features", "true"], "--cache_vision_features"),
        (["--max_steps", "-1"], "--max_steps"),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_flag(model_folders, shards, extra, flag):
    argv = [
        "--lm_model_name_or_path", model_folders["tiny-llama"], "--vision_model_name_or_path", model_folders["tiny-clip"],
        "--streaming", "--dataset_names", str(shards / "part-*.jsonl"), "--eval_dataset_names", str(shards / "eval.jsonl"),
        "--max_steps", "5", *extra,
    ]
    with pytest.raises(ConfigError, match=flag):
        parse_args(argv)


def test_eval_by_ratio_of_a_stream_is_refused(model_folders, shards):
    argv = [
        "--lm_model_name_or_path", model_folders["tiny-llama"], "--vision_model_name_or_path", model_folders["tiny-clip"],
        "--streaming", "--dataset_names", str(shards / "part-*.jsonl"), "--max_steps", "5",
    ]
    with pytest.raises(ConfigError, match="--eval_dataset_names"):
        parse_args(argv)


def test_a_stream_shorter_than_one_batch_stops_with_a_message(model_folders, tmp_path):
    _text_shards(tmp_path / "tiny", records=3, shards=3)
    proc = subprocess.run(_command(model_folders, tmp_path / "tiny", tmp_path / "out", per_device_train_batch_size=4),
                          cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "fewer samples than one global batch (4 on each of 1 processes; their parts start with [3])" in proc.stderr


def _text_shards(folder: Path, records: int, shards: int = 10) -> None:
    folder.mkdir()
    per_shard = records // shards
    for s in range(shards):
        with open(folder / f"part-{s:03d}.jsonl", "w") as f:
            for i in range(per_shard):
                f.write(json.dumps({"conversations": [{"from": "human", "value": f"q{s}.{i}"}, {"from": "gpt", "value": "a"}]}) + "\n")
    (folder / "eval.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")


_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _command(model_folders, folder: Path, out: Path, **extra) -> list[str]:
    """``python -m mmtrain.train`` streaming ``folder``'s shards for two steps."""
    flags = {"output_dir": out, "max_steps": 2, "eval_generate": 0, "export_each_epoch": "false", "per_device_train_batch_size": 2, **extra}
    return [
        sys.executable, "-m", "mmtrain.train", *common_flags(model_folders, folder, **flags),
        "--streaming", "--dataset_names", str(folder / "part-*.jsonl"), "--eval_dataset_names", str(folder / "eval.jsonl"),
    ]


def _peak_rss_mib(model_folders, folder: Path, out: Path) -> float:
    """Peak resident memory of one two-step streamed run, of that process alone (``wait4``)."""
    proc = subprocess.Popen(_command(model_folders, folder, out), cwd=REPO, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output[-4000:]
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def test_host_memory_stays_flat_as_the_stream_grows(model_folders, tmp_path):
    small, large = tmp_path / "10k", tmp_path / "100k"
    _text_shards(small, 10_000)
    _text_shards(large, 100_000)
    rss_small = _peak_rss_mib(model_folders, small, tmp_path / "out-small")
    rss_large = _peak_rss_mib(model_folders, large, tmp_path / "out-large")
    # Read whole, 90K more records cost well over 50 MiB as Python objects; streamed, only the buffer is held.
    assert rss_large - rss_small < 25, f"peak RSS {rss_small:.0f} MiB with 10K records, {rss_large:.0f} MiB with 100K"
