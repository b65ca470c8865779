"""The non-finite-loss decision over NCCL, where a process stopping alone would leave the other in a collective until NCCL's timeout."""

from __future__ import annotations

import pytest

from tests.training.test_objective import assert_a_nan_on_one_process_stops_both


@pytest.mark.gpus(2)
def test_a_nan_loss_on_one_gpu_stops_both_processes_promptly(model_folders, data_path, tmp_path):
    assert_a_nan_on_one_process_stops_both(model_folders, data_path, tmp_path)
