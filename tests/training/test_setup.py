"""training/setup.py: the run as mmtrain.memory models it (what the full-LM fit warning predicts)."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from mmtrain.args import DataArguments, TrainArguments
from mmtrain.training.setup import memory_setup


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_memory_setup_takes_a_token_budget_as_one_full_row(accelerator):
    setup = memory_setup(accelerator, DataArguments(max_tokens_per_batch=16384), TrainArguments(per_device_train_batch_size=4))
    assert (setup.micro_batch, setup.seq_len) == (1, 16384)
    assert (setup.zero_stage, setup.num_gpus, setup.offload) == (0, 1, "none")


def test_memory_setup_takes_samples_of_the_longest_length_and_the_compile_decision(accelerator):
    data = DataArguments(max_seq_len=1024)
    setup = memory_setup(accelerator, data, TrainArguments(per_device_train_batch_size=4, gradient_checkpointing=True))
    assert (setup.micro_batch, setup.seq_len, setup.gradient_checkpointing) == (4, 1024, True)
    assert not setup.compiled  # auto: compiled on CUDA only
    assert memory_setup(accelerator, data, TrainArguments(torch_compile="true")).compiled


def test_memory_setup_takes_dpo_and_its_precomputed_reference(accelerator):
    setup = memory_setup(accelerator, DataArguments(), TrainArguments(objective="dpo", precompute_ref=True))
    assert setup.preference_pairs and setup.precompute_ref
    assert not memory_setup(accelerator, DataArguments(), TrainArguments(objective="dpo")).precompute_ref
