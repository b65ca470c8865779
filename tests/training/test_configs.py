"""Every shipped Accelerate config loads, documents itself, and maps to what it says."""

import re

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from .conftest import CONFIGS

SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml"))
EXPECTED = {
    "single_process.yaml": ("NO", None, "none", "none"),
    "zero0.yaml": ("DEEPSPEED", 0, "none", "none"),
    "zero1.yaml": ("DEEPSPEED", 1, "none", "none"),
    "zero2.yaml": ("DEEPSPEED", 2, "none", "none"),
    "zero2_offload.yaml": ("DEEPSPEED", 2, "cpu", "none"),
    "zero3.yaml": ("DEEPSPEED", 3, "none", "none"),
    "zero3_offload.yaml": ("DEEPSPEED", 3, "cpu", "cpu"),
    "multi_machine_zero2.yaml": ("DEEPSPEED", 2, "none", "none"),
    "sp2_zero3.yaml": ("DEEPSPEED", 3, "none", "none"),
}


def test_every_promised_config_is_shipped():
    assert set(SHIPPED) == set(EXPECTED)


@pytest.mark.parametrize("name", SHIPPED)
def test_config_loads_and_says_what_it_is_for(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    kind, stage, offload_opt, offload_param = EXPECTED[name]
    assert str(config.distributed_type).split(".")[-1] == kind
    if stage is not None:
        ds = config.deepspeed_config
        assert ds["zero_stage"] == stage
        assert ds["offload_optimizer_device"] == offload_opt
        assert ds["offload_param_device"] == offload_param
        assert ds["gradient_clipping"] == 1.0
        assert ds["zero3_init_flag"] == (stage == 3)
    header = path.read_text().split("\n")
    comments = [line for line in header if line.startswith("#")]
    assert header[0].startswith("#") and len(comments) >= 2, "opens with a comment naming its use"
    assert any(re.search(rf"accelerate launch --config_file accelerate_configs/{re.escape(name)} .*mmtrain/train.py", c) for c in comments)


def test_multi_machine_config_names_what_every_machine_needs():
    """The launch settings a multi-machine run needs are all there (test_process_counts.py runs it as two machines)."""
    config = load_config_from_file(str(CONFIGS / "multi_machine_zero2.yaml"))
    assert config.num_machines == 2 and config.machine_rank == 0
    assert config.main_process_ip and config.main_process_port and config.same_network
    assert config.num_processes % config.num_machines == 0
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    header = (CONFIGS / "multi_machine_zero2.yaml").read_text()
    assert "--machine_rank 0" in header and "--machine_rank 1" in header


def test_sequence_parallel_config_launches_a_group_and_names_the_flag():
    """Its process count is the group size its command passes (a run whose count the size does not divide is refused)."""
    config = load_config_from_file(str(CONFIGS / "sp2_zero3.yaml"))
    header = (CONFIGS / "sp2_zero3.yaml").read_text()
    size = int(re.search(r"--sequence_parallel_size (\d+)", header).group(1))
    assert config.num_processes == size == 2
