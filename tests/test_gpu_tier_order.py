"""The GPU tier's row order (tests/gpu/conftest.py), checked where the tier itself skips: on a CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.gpu.conftest import RESULTS, row_seconds, slowest_first


def test_rows_run_slowest_first_and_new_rows_before_all(tmp_path):
    (tmp_path / "gpu_tier_a.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 50.0}, {"row": "b", "seconds": 400.0}]}))
    (tmp_path / "gpu_tier_b.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 90.0}, {"row": "c", "error": "no time"}]}))
    (tmp_path / "gpu_tier_broken.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 999.0}]}))
    seconds = row_seconds(tmp_path)
    assert seconds == {"a": 90.0, "b": 400.0}  # each row's longest run; other files and broken ones ignored
    items = [SimpleNamespace(name=n) for n in ("a", "b", "new")]
    assert [i.name for i in slowest_first(items, seconds)] == ["new", "b", "a"]


def test_rows_are_timed_from_every_folder_given(tmp_path):
    (tmp_path / "archive").mkdir()
    (tmp_path / "gpu_tier_new.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 10.0}]}))
    (tmp_path / "archive" / "gpu_tier_old.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 30.0}, {"row": "b", "seconds": 5.0}]}))
    assert row_seconds(tmp_path) == {"a": 10.0}
    assert row_seconds(tmp_path, tmp_path / "archive") == {"a": 30.0, "b": 5.0}


def test_the_kept_tier_results_time_the_rows():
    """Every row timed in the current results (not the archive) orders the tier by at least that time."""
    current = row_seconds(RESULTS)
    assert len(current) >= 30, sorted(current)  # the latest one- and two-GPU runs time every row they ran
    seconds = row_seconds()
    assert all(seconds[row] >= s for row, s in current.items())
    assert any(row.startswith("test_one_gpu[") for row in current) and any(row.startswith("test_two_gpus[") for row in current), sorted(current)
