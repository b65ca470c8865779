"""``--sequence_parallel_size``: refused where it cannot run, before any weights; two CPU processes train as one.

The two-process run is the real entry point under DeepSpeed (ZeRO-2, fp32 so that the
comparison is tight): one group of two processes splits every packed row, and its losses
must be those of one process training on the same rows. A run resumed from its step-2
checkpoint repeats its steps 3 and 4.
"""

from __future__ import annotations

import pytest

from mmtrain.args import ConfigError, TrainArguments, parse_args

from .conftest import common_flags, launch, train_losses


def _argv(model_folders, **extra):
    flags = {"lm_model_name_or_path": str(model_folders["tiny-llama"]), "vision_model_name_or_path": str(model_folders["tiny-clip"])}
    flags.update({k: str(v) for k, v in extra.items()})
    return [part for k, v in flags.items() for part in (f"--{k}", v)]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"sequence_parallel_size": 0}, r"--sequence_parallel_size must be >= 1, got 0"),
        ({"sequence_parallel_size": 2, "enable_mmca_attention": "true", "per_device_train_batch_size": 1},
         r"--sequence_parallel_size 2 cannot split MMCA \(--enable_mmca_attention\): .*passes no mask"),
        ({"sequence_parallel_size": 2, "max_tokens_per_batch": 256, "packed_attention": "flex_attention"},
         r"--sequence_parallel_size 2 cannot split --packed_attention flex_attention"),
        ({"sequence_parallel_size": 2}, r"--sequence_parallel_size 2 splits one row per micro-batch: pass --per_device_train_batch_size 1"),
        ({"sequence_parallel_size": 2, "per_device_train_batch_size": 1, "objective": "dpo"},
         r"--sequence_parallel_size 2 is not supported with --objective dpo"),
    ],
)
def test_flags_that_cannot_split_are_refused_naming_the_flag(model_folders, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(_argv(model_folders, **extra))


def _check(model_folders, accelerator, **extra):
    from mmtrain.training.sequence_parallel import check_sequence_parallel

    model_args, _, train_args = parse_args(_argv(model_folders, per_device_train_batch_size=1, **extra))
    check_sequence_parallel(accelerator, model_args, train_args)


def test_process_counts_heads_and_deepspeed_are_checked_before_weights(model_folders, accelerator):
    """A one-process CPU run without DeepSpeed: the first thing missing is named; size 1 asks for nothing."""
    _check(model_folders, accelerator)  # --sequence_parallel_size 1: nothing to check
    with pytest.raises(ConfigError, match=r"--sequence_parallel_size 2 runs through DeepSpeed's Ulysses attention: launch with a DeepSpeed"):
        _check(model_folders, accelerator, sequence_parallel_size=2)


def test_a_size_the_process_count_does_not_divide_is_refused_before_weights(model_folders, tmp_path):
    """Launched as two processes under DeepSpeed: groups of 3 cannot share 2 processes (one line, no weights loaded).
    Heads a size does not divide: tests/model/test_sequence_parallel.py."""
    flags = _argv(model_folders, sequence_parallel_size=3, per_device_train_batch_size=1, output_dir=tmp_path / "run")
    proc = launch(flags, config="zero2.yaml", num_processes=2, check=False, timeout=300)
    assert proc.returncode != 0
    assert "--sequence_parallel_size 3: the run has 2 processes, which groups of 3 cannot share" in proc.stdout + proc.stderr
    assert "Loading weights" not in proc.stdout + proc.stderr


def test_default_is_no_split():
    assert TrainArguments().sequence_parallel_size == 1


STEPS = 4


def _flags(model_folders, data_path, out, **extra):
    return common_flags(
        model_folders, data_path, output_dir=out, max_steps=STEPS, save_steps=2, max_tokens_per_batch=384, eval_generate=0,
        **extra,
    )


@pytest.mark.slow
def test_two_processes_splitting_each_row_train_as_one_and_resume(model_folders, data_path, tmp_path):
    """SP 2 on two processes vs one process, same packed rows (fp32): the same losses; SP 2 resumes exactly."""
    single = tmp_path / "single"
    launch(_flags(model_folders, data_path, single), config="zero2.yaml", num_processes=1, launcher_flags=("--mixed_precision", "no"))
    split = tmp_path / "split"
    sp_flags = dict(sequence_parallel_size=2)
    launch(_flags(model_folders, data_path, split, **sp_flags), config="sp2_zero3.yaml", num_processes=2, launcher_flags=("--mixed_precision", "no"))
    resumed = tmp_path / "resumed"
    checkpoint = split / "checkpoints" / "step-00000002"
    launch(
        _flags(model_folders, data_path, resumed, resume_from_checkpoint=checkpoint, **sp_flags),
        config="sp2_zero3.yaml", num_processes=2, launcher_flags=("--mixed_precision", "no"),
    )
    one, two = train_losses(single), train_losses(split)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    again = train_losses(resumed)
    for step in range(3, STEPS + 1):
        assert again[step] == pytest.approx(two[step], rel=1e-5), (step, two, again)
