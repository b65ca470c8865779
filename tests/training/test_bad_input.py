"""Bad input fails before training, says what to do, and loses nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmtrain.args import ConfigError, parse_args

from .conftest import REPO, common_flags, launch


def _train(flags, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mmtrain.train", *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_unknown_flag_is_named():
    with pytest.raises(ConfigError, match="unknown flags: --no_such_flag"):
        parse_args(["--no_such_flag", "3"])


def test_config_file_with_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\nlerning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'lerning_rate'"):
        parse_args(["--config", str(path)])


def test_config_file_values_are_used_and_flags_override(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"learning_rate": 1e-4, "lang_lora_dim": 8, "dataset_names": ["a.json", "b.json"]}))
    model_args, data_args, train_args = parse_args(["--config", str(path), "--lang_lora_dim", "4"])
    assert train_args.learning_rate == 1e-4 and model_args.lang_lora_dim == 4
    assert data_args.dataset_names == ["a.json", "b.json"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lm_model_name_or_path", "llama-9b"], r"--lm_model_name_or_path 'llama-9b' is neither a local folder nor a preset; presets: "),
        (["--vision_model_name_or_path", "tiny-llama"], r"--vision_model_name_or_path 'tiny-llama' is a language preset"),
        (["--vis_proj", "qformer"], r"--vis_proj 'qformer' is not a projector; valid: baseline, mlp, vit, perceiver"),
        (["--num_warmup_steps", "2.5"], r"--num_warmup_steps must be a ratio"),
        (["--dataset_names", "a", "b", "--dataset_samples", "1", "2", "3"], r"--dataset_samples has 3 values for 2"),
        (["--fp8_base", "--lm_training", "full", "--lang_lora_dim", "0"], r"--fp8_base holds .* --lm_training full trains all of them"),
        (["--quantize_base", "nf4", "--lm_training", "full", "--lang_lora_dim", "0"],
         r"--quantize_base nf4 holds .* --lm_training full trains all of them: nothing would be quantised; use --lm_training lora"),
        (["--quantize_base", "nf4", "--fp8_base"], r"--quantize_base nf4 and --fp8_base .*; pick one"),
        (["--quantize_vision", "nf4", "--fp8_vision"], r"--quantize_vision nf4 and --fp8_vision .*; pick one"),
        (["--quantize_base", "nf8"], r"--quantize_base"),
    ],
)
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match="without config.json"):
        parse_args(["--lm_model_name_or_path", str(tmp_path)])


def test_missing_image_stops_the_run_before_any_weights_load(tmp_path, model_folders, data_path):
    """The LM folder's weights are gone: a run that reached them would fail there, not on the image."""
    import shutil

    lm = tmp_path / "lm-without-weights"
    shutil.copytree(model_folders["tiny-llama"], lm)
    for weights in lm.glob("*.safetensors"):
        weights.unlink()
    records = [{"image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records * 4))
    flags = common_flags(model_folders, data_path, output_dir=tmp_path / "o", lm_model_name_or_path=lm, dataset_names=tmp_path / "d.json")
    proc = _train(flags)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "4 record(s) name image files that do not exist (1 file(s))" in proc.stderr and "d.json record 0:" in proc.stderr
    assert "nowhere.png" in proc.stderr and "safetensors" not in proc.stderr


def test_offload_on_a_stage_that_cannot_and_gradient_accumulation_conflict(tmp_path, model_folders, data_path):
    bad = tmp_path / "bad_offload.yaml"
    text = (REPO / "accelerate_configs" / "zero2.yaml").read_text().replace("offload_param_device: none", "offload_param_device: cpu")
    bad.write_text(text)
    proc = launch(common_flags(model_folders, data_path, output_dir=tmp_path / "o"), config=str(bad), check=False)
    # the launcher reports any failure of the script as 1
    assert proc.returncode != 0
    assert "offload_param_device: cpu needs zero_stage: 3" in proc.stderr
    # The shipped configs leave accumulation to the flag; a config that fixes it and a
    # flag that says otherwise is a conflict.
    fixed = tmp_path / "fixed_accumulation.yaml"
    fixed.write_text((REPO / "accelerate_configs" / "zero2.yaml").read_text().replace("deepspeed_config:\n", "deepspeed_config:\n  gradient_accumulation_steps: 1\n"))
    proc = launch(common_flags(model_folders, data_path, output_dir=tmp_path / "o2", gradient_accumulation_steps=2), config=str(fixed), check=False)
    assert proc.returncode != 0 and "--gradient_accumulation_steps 2 disagrees" in proc.stderr


def test_deepspeed_batch_size_that_does_not_divide(tmp_path, model_folders, data_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}))
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds}\n  zero3_init_flag: false\n"
        "num_machines: 1\nnum_processes: 1\nmachine_rank: 0\nuse_cpu: false\n"
    )
    proc = launch(common_flags(model_folders, data_path, output_dir=tmp_path / "o"), config=str(config), check=False)
    assert proc.returncode != 0
    assert "train_batch_size 7 is not --per_device_train_batch_size 4" in proc.stderr


def test_yaml_that_is_not_an_accelerate_config(tmp_path, model_folders, data_path):
    bad = tmp_path / "not_accelerate.yaml"
    bad.write_text("learning_rate: 3\n")
    proc = launch(common_flags(model_folders, data_path, output_dir=tmp_path / "o"), config=str(bad), check=False)
    assert proc.returncode != 0
    assert "distributed_type" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing started


@pytest.fixture(scope="module")
def finished_run(model_folders, data_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    proc = _train(common_flags(model_folders, data_path, output_dir=out, max_steps=3, save_steps=2, eval_generate=0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_resume_from_a_different_model(finished_run, model_folders, data_path, tmp_path):
    checkpoint = finished_run / "checkpoints" / "step-00000002"
    proc = _train(common_flags(model_folders, data_path, output_dir=tmp_path / "new", lang_lora_dim=8, resume_from_checkpoint=checkpoint))
    assert proc.returncode == 2
    assert "different model" in proc.stderr and "--lang_lora_dim" in proc.stderr


def test_output_folder_holding_another_run(finished_run, model_folders, data_path):
    proc = _train(common_flags(model_folders, data_path, output_dir=finished_run, vis_proj="baseline"))
    assert proc.returncode == 2 and "holds a run of a different model (--vis_proj: recorded 'mlp', now 'baseline')" in proc.stderr
    proc = _train(common_flags(model_folders, data_path, output_dir=finished_run))
    assert proc.returncode == 2 and "--resume_from_checkpoint latest" in proc.stderr


def test_half_written_checkpoint_is_refused(finished_run, model_folders, data_path, tmp_path):
    import shutil

    broken = tmp_path / "step-00000002"
    shutil.copytree(finished_run / "checkpoints" / "step-00000002", broken)
    (broken / "manifest.json").unlink()
    proc = _train(common_flags(model_folders, data_path, output_dir=finished_run, resume_from_checkpoint=str(broken)))
    assert proc.returncode == 2 and "cut off while being written" in proc.stderr


def test_corrupt_checkpoint_is_refused(finished_run, model_folders, data_path, tmp_path):
    import shutil

    broken = tmp_path / "step-00000002"
    shutil.copytree(finished_run / "checkpoints" / "step-00000002", broken)
    (broken / "optimizer.bin").write_bytes(b"not a checkpoint")
    proc = _train(common_flags(model_folders, data_path, output_dir=finished_run, resume_from_checkpoint=str(broken)))
    assert proc.returncode == 2 and "cannot be loaded" in proc.stderr


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(model_folders, data_path, tmp_path):
    out = tmp_path / "run"
    proc = _train(common_flags(model_folders, data_path, output_dir=out, max_steps=30, save_steps=1, learning_rate=1e30, eval_generate=0, max_grad_norm=1e30))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "loss is nan at step" in proc.stderr or "loss is inf at step" in proc.stderr
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and all((c / "manifest.json").exists() for c in checkpoints)


def _lm_without_weights(tmp_path, model_folders):
    # a run that reached the weights would fail on them, not with the message tested
    import shutil

    lm = tmp_path / "lm-without-weights"
    shutil.copytree(model_folders["tiny-llama"], lm)
    for weights in lm.glob("*.safetensors"):
        weights.unlink()
    return lm


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without a CUDA GPU")
def test_fp8_base_on_cpu_is_refused_before_weights_load(tmp_path, model_folders, data_path):
    lm = _lm_without_weights(tmp_path, model_folders)
    for flag in ("--fp8_base", "--fp8_vision"):
        proc = _train([*common_flags(model_folders, data_path, output_dir=tmp_path / "o", lm_model_name_or_path=lm), flag, "true"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"{flag} needs float8 tensor cores, but the device is cpu" in proc.stderr
        assert "safetensors" not in proc.stderr


def test_fp8_base_at_zero3_is_refused_with_the_reason(tmp_path, model_folders, data_path):
    lm = _lm_without_weights(tmp_path, model_folders)
    flags = [*common_flags(model_folders, data_path, output_dir=tmp_path / "o", lm_model_name_or_path=lm), "--fp8_base", "true"]
    proc = launch(flags, config="zero3.yaml", check=False)
    assert proc.returncode != 0
    assert "--fp8_base cannot run at ZeRO-3" in proc.stderr and "float8 partitions" in proc.stderr
    assert "safetensors" not in proc.stderr


@pytest.mark.parametrize("flag", ["--quantize_base", "--quantize_vision"])
def test_nf4_without_bitsandbytes_is_refused_naming_the_extra(monkeypatch, flag):
    # Python's own way of making a module unimportable: a None entry in sys.modules.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=rf"{flag} nf4 needs bitsandbytes, which is not installed: pip install 'mmtrain\[qlora\]'"):
        parse_args([flag, "nf4"])


def test_nf4_at_zero3_is_refused_before_weights_load(tmp_path, model_folders, data_path):
    pytest.importorskip("bitsandbytes")
    lm = _lm_without_weights(tmp_path, model_folders)
    flags = [*common_flags(model_folders, data_path, output_dir=tmp_path / "o", lm_model_name_or_path=lm), "--quantize_base", "nf4"]
    proc = launch(flags, config="zero3.yaml", check=False)
    assert proc.returncode != 0
    assert "--quantize_base nf4 cannot run at ZeRO-3" in proc.stderr and "use ZeRO 0-2" in proc.stderr
    assert "safetensors" not in proc.stderr
