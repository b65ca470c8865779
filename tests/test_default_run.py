"""The embedded default: no flags, tiny presets, the generated dataset, CPU; it must learn."""

import re

import pytest


@pytest.mark.slow
def test_default_run_learns_to_see(default_run):
    # no flags at all: run from an empty folder, as a new user would from a checkout
    tmp_path, proc = default_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.search(r"eval exact match ([\d.]+)% on (\d+) held-out questions \(majority-answer baseline ([\d.]+)%", proc.stdout)
    assert found, proc.stdout[-2000:]
    accuracy, questions, baseline = float(found[1]), int(found[2]), float(found[3])
    print(f"default run: exact match {accuracy}% on {questions} questions, baseline {baseline}%")
    assert questions >= 100
    assert accuracy >= 90.0
    assert accuracy - baseline >= 40
    out = tmp_path / "outputs" / "default"
    assert (out / "metrics.jsonl").is_file()
    exports = sorted(out.glob("epoch-*"))
    assert exports and (exports[-1] / "mmtrain_config.json").is_file()
    # the run's data went under the ignored default folder, not anywhere else
    assert (tmp_path / "data" / "generated").is_dir()
