"""Run the real entry point (``accelerate launch mmtrain/train.py``) on tiny models."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "accelerate_configs"


def common_flags(model_folders, data_path, **overrides) -> list[str]:
    flags = {
        "lm_model_name_or_path": model_folders["tiny-llama"],
        "vision_model_name_or_path": model_folders["tiny-clip"],
        "data_path": str(data_path),
        "synthetic_num_samples": "96",
        "per_device_train_batch_size": "4",
        "per_device_eval_batch_size": "8",
        "lang_lora_dim": "4",
        "logging_steps": "1",
        "eval_generate": "4",
        "max_new_tokens": "4",
        "num_train_epochs": "1",
        "learning_rate": "1e-3",
    }
    flags.update({k: str(v) for k, v in overrides.items()})
    if "max_tokens_per_batch" in flags:  # a token budget replaces the sample count (both are refused)
        del flags["per_device_train_batch_size"]
    argv = []
    for k, v in flags.items():
        argv += [f"--{k}"] + (v.split(" ") if k in ("dataset_names", "dataset_samples") else [v])
    return argv


def launch(flags: list[str], *, config: str | None = None, num_processes: int = 1, timeout: int = 600, check: bool = True, background: bool = False, launcher_flags: tuple[str, ...] = ()):
    """``accelerate launch [--config_file] [LAUNCHER_FLAGS] mmtrain/train.py FLAGS`` in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config:
        cmd += ["--config_file", str(CONFIGS / config)]
    cmd += ["--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", str(_free_port()), *launcher_flags]
    cmd += [str(REPO / "mmtrain" / "train.py"), *flags]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(output_dir) if r["split"] == "train"}


@pytest.fixture(scope="session")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def kill_group(proc) -> None:
    """SIGKILL a background run and every process it started: a kill, not a polite stop.

    Killing the launcher's process group is not enough: torch's elastic launcher (behind
    ``accelerate launch`` for DeepSpeed and multi-process runs) starts each worker in a
    session of its own, so the workers would outlive it and go on training. The whole
    process tree is collected first, then killed.
    """
    import psutil  # a dependency of accelerate

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended on its own meanwhile
    proc.wait()
    psutil.wait_procs(tree, timeout=60)


def kill_after_checkpoint(proc, out: Path, step: int, timeout: float = 600, output=None) -> Path:
    """SIGKILL a background run once checkpoint ``step`` is complete; returns that checkpoint's folder.

    ``output()`` gives the run's output for a failure message (default: what ``launch(...,
    background=True)`` piped). A run still short of the checkpoint after ``timeout`` is killed too.
    """
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    target = checkpoint / "manifest.json"
    output = output or (lambda: proc.stdout.read()[-4000:])
    deadline = time.time() + timeout
    while not target.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before checkpoint {step}:\n{output()}")
        if time.time() > deadline:
            kill_group(proc)
            raise AssertionError(f"no checkpoint {step} within {timeout} s:\n{output()}")
        time.sleep(0.05)
    kill_group(proc)
    # A run that ended before the kill went on saving past this checkpoint, and
    # --save_total_limit may have deleted it: the resume below would then test nothing.
    if not target.exists():
        raise AssertionError(
            f"checkpoint {step} is gone after the kill (exit code {proc.returncode}): the run went on and rotated it out, "
            f"leaving {sorted(p.name for p in checkpoint.parent.iterdir())}"
        )
    return checkpoint


def kill_and_resume(flags, tmp_path: Path, step: int, *, config: str, num_processes: int = 1, launcher_flags: tuple[str, ...] = ()):
    """An uninterrupted run, and one SIGKILLed once checkpoint ``step`` is complete and resumed from that checkpoint.

    ``flags(output_dir, **extra)`` gives a run's flags; the resume adds
    ``resume_from_checkpoint``. Returns the uninterrupted run's folder, the resumed run's
    folder and the resume's output. The checkpoint is named, not ``latest``: a fast run
    may pass later ones before the kill lands.
    """
    reference = tmp_path / "uninterrupted"
    launch(flags(reference), config=config, num_processes=num_processes, launcher_flags=launcher_flags)
    out = tmp_path / "resumed"
    proc = launch(flags(out), config=config, num_processes=num_processes, launcher_flags=launcher_flags, background=True)
    checkpoint = kill_after_checkpoint(proc, out, step)
    proc = launch(flags(out, resume_from_checkpoint=checkpoint), config=config, num_processes=num_processes, launcher_flags=launcher_flags)
    return reference, out, proc.stdout + proc.stderr
