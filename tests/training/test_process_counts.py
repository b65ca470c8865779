"""Runs that change process count at a resume, and runs launched as two machines, through the real entry point.

A checkpoint of 2 processes x accumulation 1 resumes on 1 process x accumulation 2
(ZeRO-2) and one of 1 x 2 on 2 x 1 (ZeRO-3): the same samples per optimizer step, so the
continued losses and final weights match the uninterrupted run, and the epoch's samples
(from ``--record_samples``) are each seen exactly once. Two ``accelerate launch``
commands as machine 0 and machine 1 give the losses of one launch of two processes, and
stop at start-up, naming the flag, when their flags differ.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CONFIGS, REPO, _free_port, common_flags, launch, train_losses

pytestmark = pytest.mark.slow

TRAIN_SAMPLES = 88  # 98 generated, 10 held out: 11 optimizer steps of 8 samples, no batch padded
RESUME_AT = 8


def _flags(model_folders, data_path, out, **extra):
    return common_flags(
        model_folders, data_path, output_dir=out, synthetic_num_samples=98, eval_generate=0, save_steps=4,
        record_samples="true", **extra,
    )


@pytest.fixture(scope="module")
def runs(model_folders, data_path, tmp_path_factory):
    """Uninterrupted runs and their resumes on the other count, made once for the tests below."""
    root = tmp_path_factory.mktemp("counts")
    made = {}
    logs = {}

    def get(name):
        if name in made:
            return made[name]
        out = root / name
        if name == "zero2_two":
            launch(_flags(model_folders, data_path, out), config="zero2.yaml", num_processes=2)
        elif name == "zero2_two_resumed_on_one":
            checkpoint = get("zero2_two") / "checkpoints" / f"step-{RESUME_AT:08d}"
            proc = launch(
                _flags(model_folders, data_path, out, gradient_accumulation_steps=2, resume_from_checkpoint=checkpoint),
                config="zero2.yaml", num_processes=1,
            )
            logs[name] = proc.stdout + proc.stderr
        elif name == "zero3_one":
            launch(_flags(model_folders, data_path, out, gradient_accumulation_steps=2), config="zero3.yaml", num_processes=1)
        elif name == "zero3_one_resumed_on_two":
            checkpoint = get("zero3_one") / "checkpoints" / f"step-{RESUME_AT:08d}"
            launch(_flags(model_folders, data_path, out, resume_from_checkpoint=checkpoint), config="zero3.yaml", num_processes=2)
        made[name] = out
        return out

    get.logs = logs
    return get


def _samples(output_dir: Path, up_to_step: int | None = None) -> list[int]:
    """Dataset indices of every recorded micro-batch of epoch 0 (of steps up to ``up_to_step``)."""
    found = []
    for path in sorted((output_dir / "samples").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["epoch"] == 0 and (up_to_step is None or record["step"] <= up_to_step):
                found += record["indices"]
    return found


def _final_state(output_dir: Path) -> dict:
    return load_file(output_dir / "checkpoints" / "step-00000011" / "trainable_state.safetensors")


@pytest.mark.parametrize(
    "uninterrupted, resumed, written_by, resumed_on",
    [("zero2_two", "zero2_two_resumed_on_one", 2, 1), ("zero3_one", "zero3_one_resumed_on_two", 1, 2)],
)
def test_resume_on_another_process_count_continues_the_run(runs, uninterrupted, resumed, written_by, resumed_on):
    reference, out = runs(uninterrupted), runs(resumed)
    manifest = json.loads((reference / "checkpoints" / f"step-{RESUME_AT:08d}" / "manifest.json").read_text())
    assert manifest["num_processes"] == written_by
    assert json.loads((out / "checkpoints" / "step-00000011" / "manifest.json").read_text())["num_processes"] == resumed_on

    # the losses after the checkpoint are those of the uninterrupted run (same samples per step)
    expected, got = train_losses(reference), train_losses(out)
    assert sorted(got) == list(range(RESUME_AT + 1, 12))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=2e-3), step
    # so are the final fp32 weights and Adam moments: the moments and step count came back too
    a, b = _final_state(reference), _final_state(out)
    assert a.keys() == b.keys() and any(k.startswith("exp_avg_sq/") for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-2, atol=1e-5), key
    moved = _final_state(reference)
    first = load_file(reference / "checkpoints" / f"step-{RESUME_AT:08d}" / "trainable_state.safetensors")
    assert any(not torch.equal(first[k], moved[k]) for k in first if k.startswith("param/")), "training moved nothing"

    # every sample of the epoch exactly once: before the checkpoint on one count, after it on the other
    before, after = _samples(reference, up_to_step=RESUME_AT), _samples(out)
    assert len(before) == RESUME_AT * 8 and len(after) == TRAIN_SAMPLES - RESUME_AT * 8
    assert sorted(before + after) == list(range(TRAIN_SAMPLES))
    assert sorted(_samples(reference)) == list(range(TRAIN_SAMPLES))  # the uninterrupted run, the same way


def test_resume_on_another_count_says_what_it_did(runs):
    runs("zero2_two_resumed_on_one")
    log = runs.logs["zero2_two_resumed_on_one"]
    assert "was written by 2 processes and this run has 1: loaded its whole trainable state" in log
    # 8 steps x 2 processes x 4 samples = 64 samples: 16 batches of 4 on the one process
    assert f"epoch 0, step {RESUME_AT}, {RESUME_AT * 2} batches into the epoch" in log


def test_checkpoint_without_portable_state_is_refused_on_another_count(runs, model_folders, data_path, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(runs("zero2_two") / "checkpoints" / f"step-{RESUME_AT:08d}", old)
    os.remove(old / "trainable_state.safetensors")  # as written before this file existed
    proc = launch(
        _flags(model_folders, data_path, tmp_path / "run", gradient_accumulation_steps=2, resume_from_checkpoint=old),
        config="zero2.yaml", num_processes=1, check=False,
    )
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error and "written by 2 processes and this run has 1" in error[0] and "--num_processes 2" in error[0], proc.stderr[-3000:]
    assert "trainable_state.safetensors" in error[0] and "pytorch_model" in error[0]  # what it found
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


def _launch_machine(rank: int, port: int, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_machine_zero2.yaml"),
        "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        str(REPO / "mmtrain" / "train.py"), *flags,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_machines(flags0: list[str], flags1: list[str], timeout: int = 600) -> list[tuple[int, str]]:
    port = _free_port()
    procs = [_launch_machine(1, port, flags1), _launch_machine(0, port, flags0)]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results[::-1]  # machine 0 first


def test_two_machines_train_as_one_launch_of_two_processes(runs, model_folders, data_path, tmp_path):
    out = tmp_path / "run"
    flags = _flags(model_folders, data_path, out)
    for code, log in _two_machines(flags, flags):
        assert code == 0, log[-4000:]
    expected, got = train_losses(runs("zero2_two")), train_losses(out)
    assert sorted(got) == list(range(1, 12))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    assert sorted(_samples(out)) == list(range(TRAIN_SAMPLES))


def test_machines_started_with_different_flags_stop_naming_the_flag(model_folders, data_path, tmp_path):
    flags = common_flags(model_folders, data_path, output_dir=tmp_path / "run", max_steps=1, eval_generate=0)
    results = _two_machines(flags, flags + ["--learning_rate", "2e-3"], timeout=300)
    for machine, (code, log) in enumerate(results):
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert code != 0 and errors, (machine, log[-3000:])
        assert "--learning_rate '2e-3'" not in errors[0]  # the parsed value, not the typed text
        assert "process 1" in errors[0] and "with --learning_rate 0.002" in errors[0] and "0.001" in errors[0], errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
