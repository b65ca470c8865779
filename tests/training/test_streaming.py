"""``--streaming`` through the real entry point: exact resume on one and two processes, refused flags, flat memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmtrain.args import ConfigError, parse_args
from mmtrain.data.synthetic import generate_synthetic, generate_synthetic_pairs

from .conftest import REPO, common_flags, kill_and_resume, metrics, train_losses

STEPS = 8
SAVE_EVERY = 4  # inside epoch 0 on one process, inside epoch 1 on two
SHARDS = 4
PER_SHARD = 3  # 12 records: an epoch is 6 steps of 2 on one process, 3 on each of two


def _write_shards(train_json: str) -> Path:
    folder = Path(train_json).parent
    records = json.loads((folder / "train.json").read_text())
    for s in range(SHARDS):
        lines = [json.dumps(r) for r in records[s * PER_SHARD : (s + 1) * PER_SHARD]]
        (folder / f"part-{s}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in records[SHARDS * PER_SHARD :]) + "\n")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Synthetic records in 4 JSONL shards beside their images, and an eval file."""
    return _write_shards(generate_synthetic(str(tmp_path_factory.mktemp("stream") / "synthetic"), SHARDS * PER_SHARD + 8, seed=1))


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory) -> Path:
    """Synthetic preference pairs in 4 JSONL shards beside their images, and an eval file."""
    return _write_shards(generate_synthetic_pairs(str(tmp_path_factory.mktemp("stream") / "pairs"), SHARDS * PER_SHARD + 8, seed=1))


def _flags(model_folders, shards: Path, out, train_glob: str = "part-*.jsonl", eval_file: str = "eval.jsonl", **extra) -> list[str]:
    settings = dict(
        max_steps=STEPS, save_steps=SAVE_EVERY, per_device_train_batch_size=2, eval_generate=0, record_samples="true",
        export_each_epoch="false", num_train_epochs=3, save_total_limit=10,
    )
    flags = common_flags(model_folders, shards, output_dir=out, **{**settings, **extra})
    return flags + ["--streaming", "--shuffle_buffer_size", "6", "--dataset_names", str(shards / train_glob),
                    "--eval_dataset_names", str(shards / eval_file)]


def _samples(out: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((out / "samples").glob("rank-*.jsonl"))}


def _kill_and_resume(model_folders, shards: Path, tmp_path: Path, num_processes: int, *, step: int = SAVE_EVERY, steps: int = STEPS, **extra):
    """An uninterrupted run, and one killed after its checkpoint ``step`` and resumed from it; both folders and the resume's output."""
    reference, out, log = kill_and_resume(
        lambda folder, **more: _flags(model_folders, shards, folder, max_steps=steps, **extra, **more), tmp_path, step,
        config="zero0.yaml", num_processes=num_processes,
    )
    expected, resumed = train_losses(reference), train_losses(out)
    assert sorted(resumed) == list(range(1, steps + 1))
    for later in range(step + 1, steps + 1):
        assert resumed[later] == expected[later], f"step {later}: {resumed[later]} != {expected[later]}"
    return reference, out, log


@pytest.mark.slow
def test_a_killed_and_resumed_stream_of_preference_pairs_trains_on_the_same_pairs(model_folders, pair_shards, tmp_path):
    """DPO reads pairs from shards as SFT reads conversations: under a token budget counting each pair's
    shared-prompt row, killed after a checkpoint and resumed, it logs the uninterrupted run's losses."""
    reference, out, log = _kill_and_resume(
        model_folders, pair_shards, tmp_path, 1, objective="dpo", dpo_beta=0.5, learning_rate=5e-3, max_tokens_per_batch=400,
    )
    assert "each pair's prompt is computed once" in log
    assert _samples(reference) == _samples(out)
    first = [r for r in metrics(reference) if r["split"] == "train"][0]
    assert first["margin"] == 0.0 and first["accuracy"] == 0.5  # the starting model is the reference
    assert any(r["split"] == "eval" and "margin" in r for r in metrics(reference))


def _every_record(shards: Path) -> list[str]:
    return sorted(f"{shards / f'part-{s}.jsonl'}:{i}" for s in range(SHARDS) for i in range(PER_SHARD))


@pytest.mark.slow
@pytest.mark.parametrize(("num_processes", "num_workers"), [(1, 0), (2, 0), (1, 2)])
def test_killed_and_resumed_stream_trains_on_the_same_samples(model_folders, shards, tmp_path, num_processes, num_workers):
    # with workers, each reads half of the process's shards
    reference, out, log = _kill_and_resume(model_folders, shards, tmp_path, num_processes, num_workers=num_workers)
    assert f"step-{SAVE_EVERY:08d}: epoch {0 if num_processes == 1 else 1}, step {SAVE_EVERY}" in log
    samples = _samples(reference)
    assert samples == _samples(out) and len(samples) == num_processes
    # ids are shard:record; every epoch covers every record once, each in its own order
    epochs = [[i for lines in samples.values() for line in lines if line["epoch"] == e for i in line["indices"]] for e in (0, 1)]
    assert sorted(epochs[0]) == _every_record(shards)
    assert len(set(epochs[1])) == len(epochs[1]) and epochs[1] != epochs[0][: len(epochs[1])]
    assert sum(1 for line in samples["rank-0.jsonl"] if line["epoch"] == 0) == SHARDS * PER_SHARD // (2 * num_processes)


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [1, 2])
def test_killed_and_resumed_stream_under_a_token_budget_trains_on_the_same_samples(model_folders, shards, tmp_path, num_processes):
    # About two synthetic samples (64 image tokens each) fit 256 tokens: the checkpoint
    # falls inside an epoch, where a sample that overflowed a micro-batch waits in the state.
    reference, out, _ = _kill_and_resume(model_folders, shards, tmp_path, num_processes, max_tokens_per_batch=256)
    samples = _samples(reference)
    assert samples == _samples(out) and len(samples) == num_processes
    lines = [line for rank in samples.values() for line in rank]
    if num_processes == 1:  # with two, the epoch ends for both when the first part runs out
        assert sorted(i for line in lines if line["epoch"] == 0 for i in line["indices"]) == _every_record(shards)
    assert {len(line["indices"]) for line in lines} != {2}  # sized by tokens, not by --per_device_train_batch_size


@pytest.mark.slow
@pytest.mark.parametrize(("num_processes", "accumulation"), [(1, 4), (2, 2)])
def test_an_epoch_end_closes_the_accumulated_step_and_a_resume_there_is_exact(model_folders, shards, tmp_path, num_processes, accumulation):
    # An epoch is 6 micro-batches of 2 on one process, 3 on each of two: one whole accumulated
    # step and one of the rest, which the epoch's end closes. No gradient crosses into the
    # next epoch, so the checkpoint at the epoch's end (step 2) holds everything: killed
    # there and resumed, the run goes on as the uninterrupted one, across the next epoch end.
    reference, out, _ = _kill_and_resume(
        model_folders, shards, tmp_path, num_processes, step=2, steps=4, save_steps=0, gradient_accumulation_steps=accumulation,
    )
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 2)
    samples = _samples(reference)
    assert samples == _samples(out) and len(samples) == num_processes
    per_epoch = SHARDS * PER_SHARD // (2 * num_processes)
    steps = [line["step"] for line in samples["rank-0.jsonl"]]
    window = [1] * accumulation + [2] * (per_epoch - accumulation)
    assert steps == window + [s + 2 for s in window]  # two epochs of two steps each


@pytest.mark.slow
def test_killed_and_resumed_stream_with_packing_and_the_feature_cache_on_disk(model_folders, shards, tmp_path):
    # Packed rows and cached features are a function of each batch alone, so a stream takes
    # them as the in-memory path does; the cache folder is the run's own, shared by both runs'
    # halves like a restart would share it.
    reference, out, log = _kill_and_resume(
        model_folders, shards, tmp_path, 1, packing="true", cache_vision_features="true", vision_cache_dir="features"
    )
    assert _samples(reference) == _samples(out)
    cached = list((out / "features").rglob("*.pt")) or [p for p in (out / "features").rglob("*") if p.is_file()]
    assert cached, "no feature was written to the cache folder"


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--dataset_concatenate_samples", "2"], "--dataset_concatenate_samples"),
        (["--dataset_samples", "10"], "--dataset_samples"),
        (["--cache_vision_features", "true"], "--cache_vision_features with --streaming needs --vision_cache_dir"),
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
    """Text-only records in JSONL shards, written from one template: a million take a few seconds, not a minute."""
    folder.mkdir()
    per_shard = records // shards
    template = '{"conversations": [{"from": "human", "value": "q%d.%d"}, {"from": "gpt", "value": "a"}]}\n'
    for s in range(shards):
        with open(folder / f"part-{s:03d}.jsonl", "w") as f:
            f.write("".join(template % (s, i) for i in range(per_shard)))
    (folder / "eval.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")


_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _command(model_folders, folder: Path, out: Path, **extra) -> list[str]:
    """``python -m mmtrain.train`` streaming ``folder``'s shards for two steps."""
    flags = {"output_dir": out, "max_steps": 2, "eval_generate": 0, "export_each_epoch": "false", "per_device_train_batch_size": 2, **extra}
    return [
        sys.executable, "-m", "mmtrain.train", *common_flags(model_folders, folder, **flags),
        "--streaming", "--dataset_names", str(folder / "part-*.jsonl"), "--eval_dataset_names", str(folder / "eval.jsonl"),
    ]


# The entry point, reporting its own peak RSS as it exits: VmHWM, the peak of its own
# address space. wait4's ru_maxrss would not do: a child started by fork/vfork + exec keeps
# the parent's peak in it, and this test's parent (pytest with torch loaded) can be larger
# than the run under test.
_REPORT_PEAK_RSS = (
    "import atexit, runpy, sys\n"
    "def report():\n"
    "    peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "    print('peak-rss-kib', peak.split()[1], file=sys.stderr)\n"
    "atexit.register(report)\n"
    "sys.argv[0] = 'mmtrain.train'\n"
    "runpy.run_module('mmtrain.train', run_name='__main__', alter_sys=True)\n"
)


def _peak_rss_mib(model_folders, folder: Path, out: Path) -> float:
    """Peak resident memory of one two-step streamed run, of that process alone."""
    command = _command(model_folders, folder, out)
    assert command[1:3] == ["-m", "mmtrain.train"]
    proc = subprocess.run([sys.executable, "-c", _REPORT_PEAK_RSS, *command[3:]], cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return int(proc.stderr.rsplit("peak-rss-kib ", 1)[1].split()[0]) / 1024


def test_host_memory_stays_flat_as_the_stream_grows(model_folders, tmp_path):
    small, large = tmp_path / "10k", tmp_path / "1m"
    _text_shards(small, 10_000)
    _text_shards(large, 1_000_000)  # 90 MB of JSONL
    rss_small = _peak_rss_mib(model_folders, small, tmp_path / "out-small")
    rss_large = _peak_rss_mib(model_folders, large, tmp_path / "out-large")
    # Read whole, the 990K more records would cost hundreds of MiB as Python objects (the
    # file's text alone is 90 MB); streamed, only the buffer is held.
    assert rss_large - rss_small < 25, f"peak RSS {rss_small:.0f} MiB with 10K records, {rss_large:.0f} MiB with 1M"


def _tar_shards(shards: Path, folder: Path) -> None:
    """The fixture's records as WebDataset tar shards (``key.json`` + ``key.N.png``), with no image folder beside them."""
    import io
    import tarfile

    folder.mkdir()
    for s in range(SHARDS):
        with tarfile.open(folder / f"part-{s}.tar", "w") as tar:
            for i, line in enumerate((shards / f"part-{s}.jsonl").read_text().splitlines()):
                record = json.loads(line)
                members = [(f"{s}-{i}.json", json.dumps({k: v for k, v in record.items() if k != "images"}).encode())]
                members += [(f"{s}-{i}.{k}.png", (shards / image).read_bytes()) for k, image in enumerate(record.get("images", []))]
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_tar_shards_train_through_the_entry_point_and_a_truncated_one_is_named(model_folders, shards, tmp_path):
    tars = tmp_path / "tars"
    _tar_shards(shards, tars)
    # No image folder is given: the eval file holds text-only records.
    (tars / "eval.jsonl").write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    command = _command(model_folders, tars, tmp_path / "out", record_samples="true", max_steps=3)
    command[command.index(str(tars / "part-*.jsonl"))] = str(tars / "part-*.tar")
    proc = subprocess.run(command, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = [i for line in (tmp_path / "out" / "samples" / "rank-0.jsonl").read_text().splitlines() for i in json.loads(line)["indices"]]
    assert len(ids) == 6 and all(i.split(":")[0].endswith(".tar") for i in ids)

    data = (tars / "part-2.tar").read_bytes()
    (tars / "part-2.tar").write_bytes(data[: len(data) // 2 + 100])
    # The buffer fills from every shard before the first batch, so the damage is found at once.
    proc = subprocess.run(command + ["--output_dir", str(tmp_path / "out2")], cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"{tars / 'part-2.tar'}: tar shard is truncated or damaged" in proc.stderr


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> Path:
    """Hub-format Parquet shards (messages + embedded PNGs, written by datasets) and a Parquet eval file, no image file anywhere."""
    from tests.hub_data import vqa_dataset, write_parquet_shards

    folder = tmp_path_factory.mktemp("parquet-stream")
    write_parquet_shards(folder, SHARDS, PER_SHARD)
    vqa_dataset(4, start=100).to_parquet(str(folder / "eval.parquet"))
    return folder


@pytest.mark.slow
def test_killed_and_resumed_parquet_stream_with_embedded_images_trains_on_the_same_samples(model_folders, parquet_shards, tmp_path):
    # With two loader workers, each reads half the shards; the images come out of the
    # shards' rows as each sample is encoded, and the checkpointed buffer holds none.
    reference, out, log = _kill_and_resume(
        model_folders, parquet_shards, tmp_path, 1, train_glob="part-*.parquet", eval_file="eval.parquet", num_workers=2,
    )
    samples = _samples(reference)
    assert samples == _samples(out)
    epoch0 = sorted(i for line in samples["rank-0.jsonl"] if line["epoch"] == 0 for i in line["indices"])
    assert epoch0 == sorted(f"{parquet_shards / f'part-{s}.parquet'}:{i}" for s in range(SHARDS) for i in range(PER_SHARD))
    saved = (out / "checkpoints" / f"step-{SAVE_EVERY:08d}" / "stream" / "rank-0.json").read_text()
    assert "embedded:" in saved and "PNG" not in saved and len(saved) < 20_000, len(saved)
