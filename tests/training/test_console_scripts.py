"""The console scripts, as an installation writes them: each names a ``cli()`` that returns the exit status.

The package is installed (no dependencies, no network) into a temporary folder, so the
scripts and entry points tested are those of this checkout's pyproject.toml, whether or
not the environment running the suite holds an editable install of another checkout.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "mmtrain-train": "mmtrain.train:cli",
    "mmtrain-budget": "mmtrain.budget:cli",
    "mmtrain-memory": "mmtrain.memory.cli:cli",
    "mmtrain-generate": "mmtrain.generate:cli",
    "mmtrain-export": "mmtrain.export:cli",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("installed")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if proc.returncode != 0:
        pytest.skip(f"pip cannot install this checkout here: {proc.stderr[-500:]}")
    return target


def _entry_points(target: Path) -> dict[str, importlib.metadata.EntryPoint]:
    dist = next(d for d in importlib.metadata.distributions(path=[str(target)]) if d.metadata["Name"] == "mmtrain")
    return {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}


def test_every_tool_has_a_script(installed):
    found = _entry_points(installed)
    assert {name: ep.value for name, ep in found.items()} == SCRIPTS
    for name in SCRIPTS:
        assert (installed / "bin" / name).is_file(), f"no {name} script written by the installation"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_script_prints_its_help_and_exits_0(installed, name, monkeypatch, capsys):
    # The installed entry point, called as its script calls it: sys.exit(cli()) with sys.argv set.
    entry = _entry_points(installed)[name].load()
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as caught:
        sys.exit(entry())
    assert caught.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_a_bad_flag_is_exit_status_2_and_one_line(installed, monkeypatch, capsys):
    entry = _entry_points(installed)["mmtrain-train"].load()
    monkeypatch.setattr(sys, "argv", ["mmtrain-train", "--max_steps", "ten"])
    assert entry() == 2
    assert capsys.readouterr().err.splitlines() == ["error: --max_steps: expected an integer, got 'ten'"]


@pytest.mark.slow
def test_the_installed_train_script_runs_from_its_own_copy(installed, tmp_path):
    """The script file itself, run with the installed copy first on the path: a config error is status 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(installed)}
    script = installed / "bin" / "mmtrain-train"
    proc = subprocess.run(
        [sys.executable, str(script), "--lm_model_name_or_path", str(tmp_path / "nowhere")], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("error: --lm_model_name_or_path") and "Traceback" not in proc.stderr
