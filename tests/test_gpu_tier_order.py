"""The GPU tier's row order (tests/gpu/conftest.py), checked where the tier itself skips: on a CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.gpu.conftest import row_seconds, slowest_first


def test_rows_run_slowest_first_and_new_rows_before_all(tmp_path):
    (tmp_path / "gpu_tier_a.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 50.0}, {"row": "b", "seconds": 400.0}]}))
    (tmp_path / "gpu_tier_b.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 90.0}, {"row": "c", "error": "no time"}]}))
    (tmp_path / "gpu_tier_broken.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"rows": [{"row": "a", "seconds": 999.0}]}))
    seconds = row_seconds(tmp_path)
    assert seconds == {"a": 90.0, "b": 400.0}  # each row's longest run; other files and broken ones ignored
    items = [SimpleNamespace(name=n) for n in ("a", "b", "new")]
    assert [i.name for i in slowest_first(items, seconds)] == ["new", "b", "a"]


def test_the_kept_tier_results_time_the_rows():
    seconds = row_seconds()
    assert seconds["test_one_gpu[1gpu-zero2+budget]"] > 300  # the token-budget row with its resume, the slowest so far
