"""Checkpoints: which folders count, how a resume is resolved, and what a manifest must match.

The DeepSpeed side (killed and resumed runs, bit for bit) is in test_distributed.py;
here one process saves and loads through a real Accelerator.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.training.checkpoint import (
    FORMAT_VERSION,
    BatchLayout,
    CheckpointSettings,
    Checkpointer,
    TrainerState,
    check_manifest,
    list_checkpoints,
    map_position,
    remove_partial_checkpoints,
    resolve_resume,
)
from mmtrain.training.engine_view import Prepared

TRAINABLE = ["projector.0.weight", "projector.0.bias"]


def _checkpoint(output_dir, name, manifest=True):
    folder = output_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    if manifest:
        (folder / "manifest.json").write_text("{}")
    return folder


def _manifest(folder, model_args, **overrides):
    manifest = {"format_version": FORMAT_VERSION, "model": model_args.identity(), "trainable_parameters": TRAINABLE}
    manifest.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_list_checkpoints_gives_complete_ones_oldest_first(tmp_path):
    assert list_checkpoints(str(tmp_path)) == []  # no checkpoints folder yet
    for name in ("step-00000100", "step-00000002", "step-00000010"):
        _checkpoint(tmp_path, name)
    _checkpoint(tmp_path, "step-00000050", manifest=False)  # cut off before its manifest
    _checkpoint(tmp_path, "step-00000070.tmp")  # still being written
    _checkpoint(tmp_path, "step-12")  # not a name the trainer writes
    _checkpoint(tmp_path, "best")
    found = list_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in found] == ["step-00000002", "step-00000010", "step-00000100"]
    assert all(os.path.dirname(p) == str(tmp_path / "checkpoints") for p in found)


def test_resolve_resume_latest_path_and_missing(tmp_path):
    out = str(tmp_path)
    assert resolve_resume(out, None) is None
    assert resolve_resume(out, "latest") is None  # a fresh run: nothing to resume
    _checkpoint(tmp_path, "step-00000003")
    newest = _checkpoint(tmp_path, "step-00000006")
    _checkpoint(tmp_path, "step-00000009.tmp")
    assert resolve_resume(out, "latest") == str(newest)
    assert resolve_resume(out, str(newest)) == str(newest)
    with pytest.raises(ConfigError, match="no such folder") as missing:
        resolve_resume(out, str(tmp_path / "checkpoints" / "step-00000099"))
    assert "step-00000099" in str(missing.value)
    cut_off = _checkpoint(tmp_path, "step-00000012", manifest=False)
    with pytest.raises(ConfigError, match="has no manifest.json") as partial:
        resolve_resume(out, str(cut_off))
    # the message points at where the complete checkpoints are
    assert str(tmp_path / "checkpoints") in str(partial.value).split("pick a complete one under")[-1]


def test_remove_partial_checkpoints_removes_tmp_folders_only(tmp_path):
    assert remove_partial_checkpoints(str(tmp_path)) == []
    complete = _checkpoint(tmp_path, "step-00000003")
    no_manifest = _checkpoint(tmp_path, "step-00000006", manifest=False)
    partial = _checkpoint(tmp_path, "step-00000009.tmp")
    (partial / "optimizer.bin").write_bytes(b"half")
    removed = remove_partial_checkpoints(str(tmp_path))
    assert removed == [str(partial)]
    assert not partial.exists()
    assert complete.is_dir() and no_manifest.is_dir()
    assert remove_partial_checkpoints(str(tmp_path)) == []


def test_check_manifest_accepts_its_own_model_and_names_what_differs(tmp_path):
    args = ModelArguments(vis_proj="mlp", lang_lora_dim=8)
    path = _manifest(tmp_path / "ok", args)
    assert check_manifest(path, args, list(reversed(TRAINABLE)))["trainable_parameters"] == TRAINABLE  # order-free
    # settings that change neither which parameters exist nor what they mean may change
    assert check_manifest(path, ModelArguments(vis_proj="mlp", lang_lora_dim=8, attn_implementation="eager"), TRAINABLE)
    with pytest.raises(ConfigError, match=r"different model: vis_proj: recorded 'mlp', now 'vit'$"):
        check_manifest(path, ModelArguments(vis_proj="vit", lang_lora_dim=8), TRAINABLE)
    with pytest.raises(ConfigError, match=r"model: lang_lora_dim: recorded 8, now 4; vis_lora_dim: recorded 0, now 2$"):
        check_manifest(path, ModelArguments(vis_proj="mlp", lang_lora_dim=4, vis_lora_dim=2), TRAINABLE)
    with pytest.raises(ConfigError, match="trainable parameters differ"):
        check_manifest(path, args, TRAINABLE + ["projector.2.weight"])


def test_checkpoints_of_the_earlier_lora_scope_default_resume_under_auto(tmp_path):
    """--lang_lora_module_name was 'model.layers.' by default; 'auto' finds exactly those layers wherever that matched."""
    args = ModelArguments(lang_lora_dim=8)
    assert args.lang_lora_module_name == "auto"
    earlier = _manifest(tmp_path / "earlier", args, model={**args.identity(), "lang_lora_module_name": "model.layers."})
    assert check_manifest(earlier, args, TRAINABLE)
    assert check_manifest(_manifest(tmp_path / "now", args), ModelArguments(lang_lora_dim=8, lang_lora_module_name="model.layers."), TRAINABLE)
    with pytest.raises(ConfigError, match=r"model: lang_lora_module_name: recorded 'self_attn\.', now 'auto'$"):
        check_manifest(_manifest(tmp_path / "other", ModelArguments(lang_lora_dim=8, lang_lora_module_name="self_attn.")), args, TRAINABLE)


def test_check_manifest_refuses_other_formats_and_older_records(tmp_path):
    args = ModelArguments()
    newer = _manifest(tmp_path / "newer", args, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ConfigError, match=f"format {FORMAT_VERSION + 1} is not {FORMAT_VERSION}"):
        check_manifest(newer, args, TRAINABLE)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="format None"):
        check_manifest(str(empty), args, TRAINABLE)
    # a setting the record lacks counts as different, not as equal
    record = args.identity()
    del record["preset_seed"]
    older = _manifest(tmp_path / "older", args, model=record)
    with pytest.raises(ConfigError, match="model: preset_seed: recorded None, now 0"):
        check_manifest(older, args, TRAINABLE)


def test_half_written_manifest_is_a_clear_error(tmp_path):
    args = ModelArguments()
    path = _manifest(tmp_path / "cut", args)
    text = (tmp_path / "cut" / "manifest.json").read_text()
    (tmp_path / "cut" / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match="cut"):
        check_manifest(path, args, TRAINABLE)


def test_checkpointer_saves_trainable_weights_rotates_and_restores(tmp_path, tiny_args, accelerator):
    from mmtrain.model import build_model

    args = tiny_args(lang_lora_dim=4)
    model = build_model(args).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(Prepared(accelerator), args, trainable, CheckpointSettings(str(tmp_path), keep=2))

    def step():
        loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for global_step in (1, 2, 3):
        step()
        saved = checkpointer.save(TrainerState(epoch=0, step_in_epoch=global_step, global_step=global_step, tokens_seen=10 * global_step))
        assert saved == str(tmp_path / "checkpoints" / f"step-{global_step:08d}")
    # the newest two are kept, whole; no folder is left half-written
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-00000002", "step-00000003"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002", "step-00000003"]
    manifest = check_manifest(str(tmp_path / "checkpoints" / "step-00000003"), args, trainable)
    assert manifest["num_processes"] == 1 and manifest["zero_stage"] is None
    # frozen weights come from the source folders: only the trainable ones are written
    weights = load_file(tmp_path / "checkpoints" / "step-00000003" / "model.safetensors")
    assert sorted(weights) == sorted(trainable)

    def weights():
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    saved_weights = weights()
    step()  # move on past the checkpoint, then go back to it
    next_weights = weights()
    assert any(not torch.equal(next_weights[n], saved_weights[n]) for n in trainable)
    state = checkpointer.load(str(tmp_path / "checkpoints" / "step-00000003"))
    assert state == TrainerState(epoch=0, step_in_epoch=3, global_step=3, tokens_seen=30)
    for name, value in weights().items():
        assert torch.equal(value, saved_weights[name]), name
    # the optimizer's moments came back too: the same step lands on the same weights
    step()
    for name, value in weights().items():
        assert torch.equal(value, next_weights[name]), name

    other = Checkpointer(Prepared(accelerator), tiny_args(lang_lora_dim=8), trainable, CheckpointSettings(str(tmp_path), keep=2))
    with pytest.raises(ConfigError, match="model: lang_lora_dim: recorded 4, now 8"):
        other.load(str(tmp_path / "checkpoints" / "step-00000003"))


def test_map_position_carries_samples_consumed_over_to_another_layout():
    two = BatchLayout(num_processes=2, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    one = BatchLayout(num_processes=1, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert map_position(6, two, two, "ck", 0) == 6  # the same layout: as written
    assert map_position(6, two, one, "ck", 0) == 12  # 48 samples: 12 batches of 4 on one process
    assert map_position(12, one, two, "ck", 0) == 6
    assert map_position(0, two, BatchLayout(3, 5, 7), "ck", 0) == 0  # an epoch's start maps anywhere
    # 48 samples = 3 steps of 16 (2 x 8 x 1): 3 batches of 8 on each of two processes
    assert map_position(6, two, BatchLayout(2, 8, 1), "ck", 0) == 3
    with pytest.raises(ConfigError) as refused:
        map_position(6, two, BatchLayout(1, 4, 5), "ck", 2)  # 48 samples are not whole steps of 20
    message = str(refused.value)
    assert "48 samples into epoch 2" in message and "--per_device_train_batch_size 4" in message
    assert "--gradient_accumulation_steps 5" in message and "1 processes" in message and "8 samples per step" in message


def test_map_position_counts_a_sequence_parallel_group_as_one_taker_of_batches():
    """Two processes splitting each row take one micro-batch per round, as one process does."""
    budget = "--max_tokens_per_batch 512"
    split = BatchLayout(2, 1, 1, budget, sequence_parallel_size=2)
    assert split.batch_takers == 1
    assert map_position(6, split, BatchLayout(1, 1, 1, budget), "ck", 0) == 6
    assert map_position(6, split, BatchLayout(2, 1, 1, budget), "ck", 0) == 3  # plain data parallelism: 3 rounds of 2
    assert map_position(4, BatchLayout(4, 1, 1, budget, 2), split, "ck", 0) == 8
    assert BatchLayout.from_manifest({"num_processes": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                                      "token_budget": budget, "sequence_parallel_size": 2}) == split


def test_map_position_under_a_token_budget_counts_micro_batches():
    budget = "--max_tokens_per_batch 512"
    two = BatchLayout(2, 1, 1, budget)
    assert map_position(6, two, BatchLayout(1, 1, 2, budget), "ck", 0) == 12  # 12 planned micro-batches consumed
    with pytest.raises(ConfigError, match="--max_tokens_per_batch 512 and this run plans --max_tokens_per_batch 1024"):
        map_position(6, two, BatchLayout(1, 1, 2, "--max_tokens_per_batch 1024"), "ck", 0)
    with pytest.raises(ConfigError, match="this run plans --per_device_train_batch_size samples"):
        map_position(6, two, BatchLayout(1, 4, 2), "ck", 0)


def test_checkpoint_of_another_process_count_loads_its_portable_state(tmp_path, tiny_args, accelerator):
    """Without DeepSpeed, a checkpoint recorded as two processes' loads through the portable state, as exactly."""
    from mmtrain.model import build_model

    args = tiny_args(lang_lora_dim=4)
    model = build_model(args).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    def step():
        loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def weights():
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def checkpointer(batch):
        return Checkpointer(
            Prepared(accelerator, model, optimizer, scheduler), args, trainable,
            CheckpointSettings(str(tmp_path), keep=2, seed=3, per_device_train_batch_size=batch),
        )

    step()
    step()
    path = checkpointer(4).save(TrainerState(epoch=0, step_in_epoch=4, global_step=2))
    saved_weights, saved_lr = weights(), optimizer.param_groups[0]["lr"]
    step()
    expected_next = weights()
    step()
    # as if two processes of batch 2 had written it: the same 16 samples consumed
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    assert (manifest["num_processes"], manifest["per_device_train_batch_size"], manifest["gradient_accumulation_steps"]) == (1, 4, 1)
    json.dump({**manifest, "num_processes": 2, "per_device_train_batch_size": 2}, open(manifest_path, "w"))
    state = checkpointer(4).load(path)
    assert state.step_in_epoch == 4 and state.global_step == 2
    for name, value in weights().items():
        assert torch.equal(value, saved_weights[name]), name
    assert optimizer.param_groups[0]["lr"] == saved_lr  # the schedule's rate, not the fresh one's
    step()  # moments and step count came back: the same step lands on the same weights
    for name, value in weights().items():
        assert torch.allclose(value, expected_next[name], rtol=0, atol=1e-7), name

    # a position this run's batches cannot continue exactly, and a checkpoint without the portable state
    with pytest.raises(ConfigError, match="--per_device_train_batch_size 3"):
        checkpointer(3).load(path)
    os.remove(os.path.join(path, "trainable_state.safetensors"))
    with pytest.raises(ConfigError) as old:
        checkpointer(4).load(path)
    assert "written by 2 processes and this run has 1" in str(old.value) and "--num_processes 2" in str(old.value)
    assert "trainable_state.safetensors" in str(old.value) and "optimizer.bin" in str(old.value)


def _saving_run(tmp_path, tiny_args, accelerator, keep):
    """A Checkpointer over a tiny model with its portable state, and a step that changes the weights."""
    from mmtrain.model import build_model

    args = tiny_args()
    model = build_model(args).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(Prepared(accelerator, model, optimizer), args, trainable, CheckpointSettings(str(tmp_path), keep=keep))

    def step():
        loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    return checkpointer, step


def _names(output_dir) -> list[str]:
    return [os.path.basename(p) for p in list_checkpoints(str(output_dir))]


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, tiny_args, accelerator, caplog):
    """After a resume from step 4 of [4, 6], the new run's step 5 is not rotated out to keep the abandoned step 6."""
    checkpointer, step = _saving_run(tmp_path, tiny_args, accelerator, keep=2)
    for global_step in (2, 4, 6):
        step()
        checkpointer.save(TrainerState(global_step=global_step, step_in_epoch=global_step))
    assert _names(tmp_path) == ["step-00000004", "step-00000006"]
    abandoned = torch.load(tmp_path / "checkpoints" / "step-00000006" / "optimizer.bin", weights_only=True)

    with caplog.at_level("WARNING", logger="mmtrain"):
        checkpointer.load(str(tmp_path / "checkpoints" / "step-00000004"))
    assert "step-00000006" in caplog.text and "abandoned-" in caplog.text
    assert resolve_resume(str(tmp_path), "latest") == str(tmp_path / "checkpoints" / "step-00000004")
    step()
    checkpointer.save(TrainerState(global_step=5, step_in_epoch=5))
    assert _names(tmp_path) == ["step-00000004", "step-00000005"]  # rotation kept the resumed run's own
    assert resolve_resume(str(tmp_path), "latest") == str(tmp_path / "checkpoints" / "step-00000005")
    # the abandoned branch is kept whole, out of the way
    (aside,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert [p.name for p in aside.iterdir()] == ["step-00000006"]
    kept = torch.load(aside / "step-00000006" / "optimizer.bin", weights_only=True)
    assert torch.equal(kept["state"][0]["exp_avg"], abandoned["state"][0]["exp_avg"])
    # a resume from the newest one moves nothing
    checkpointer.load(str(tmp_path / "checkpoints" / "step-00000005"))
    assert _names(tmp_path) == ["step-00000004", "step-00000005"]


def test_a_kill_while_a_step_is_saved_again_loses_neither_copy(tmp_path, tiny_args, accelerator, monkeypatch):
    """Saving step 3 again, killed just before the new folder is renamed in: the old step 3 comes back whole."""
    checkpointer, step = _saving_run(tmp_path, tiny_args, accelerator, keep=3)
    step()
    final = tmp_path / "checkpoints" / "step-00000003"
    checkpointer.save(TrainerState(global_step=3, tokens_seen=111))
    step()

    class Killed(Exception):
        pass

    replace = os.replace

    def killed_before_the_new_one_is_in(src, dst):
        if str(src).endswith(".tmp"):
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_new_one_is_in)
    with pytest.raises(Killed):
        checkpointer.save(TrainerState(global_step=3, tokens_seen=222))
    monkeypatch.undo()
    # what the next start finds and cleans up: the step is whole again, as it was
    remove_partial_checkpoints(str(tmp_path))
    assert _names(tmp_path) == ["step-00000003"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000003"]
    assert json.loads((final / "trainer_state.json").read_text())["tokens_seen"] == 111
    assert checkpointer.load(str(final)).tokens_seen == 111

    # killed after the new one is in, before the old one is deleted: the new one stays, the old goes
    checkpointer.save(TrainerState(global_step=3, tokens_seen=333))
    (tmp_path / "checkpoints" / "step-00000003.old").mkdir()
    (tmp_path / "checkpoints" / "step-00000003.old" / "manifest.json").write_text("{}")
    assert remove_partial_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoints" / "step-00000003.old")]
    assert json.loads((final / "trainer_state.json").read_text())["tokens_seen"] == 333


def test_portable_state_is_streamed_and_read_one_tensor_at_a_time(tmp_path, tiny_args, accelerator):
    """The streamed file is plain safetensors, holds the same values as the model, and says what it cost."""
    from safetensors import safe_open

    checkpointer, step = _saving_run(tmp_path, tiny_args, accelerator, keep=1)
    step()
    path = checkpointer.save(TrainerState(global_step=1))
    file = os.path.join(path, "trainable_state.safetensors")
    tensors = load_file(file)
    model = checkpointer.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(tensors) == 3 * len(trainable)
    for name, p in trainable.items():
        assert torch.equal(tensors[f"param/{name}"], p.detach().float()), name
        assert tensors[f"exp_avg/{name}"].shape == p.shape and tensors[f"exp_avg_sq/{name}"].abs().sum() > 0, name
    with safe_open(file, framework="pt") as f:
        assert f.metadata()["optimizer_step"] == "1"
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["portable_state"] == {"tensors": len(tensors), "bytes": os.path.getsize(file)}
    # on the CPU the fp32 parameters are written from their own memory: no host copy at all
    assert manifest["host_memory"]["portable_state_host_copy_peak"] == [0]
    assert len(manifest["host_memory"]["save_rss_growth"]) == 1


def test_a_portable_state_that_cannot_be_written_stops_the_save_and_keeps_the_earlier_ones(tmp_path, tiny_args, accelerator, monkeypatch):
    from mmtrain.training import portable_state
    from mmtrain.training.checkpoint import CheckpointError

    checkpointer, step = _saving_run(tmp_path, tiny_args, accelerator, keep=2)
    step()
    checkpointer.save(TrainerState(global_step=1))

    def disk_full(self, name, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(portable_state.StreamedSafetensors, "write", disk_full)
    with pytest.raises(CheckpointError, match="step-00000002 could not be written .*No space left on device"):
        checkpointer.save(TrainerState(global_step=2))
    monkeypatch.undo()
    assert _names(tmp_path) == ["step-00000001"]
    assert not os.path.exists(tmp_path / "checkpoints" / "step-00000002.tmp" / "trainable_state.safetensors")
    assert remove_partial_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoints" / "step-00000002.tmp")]


def test_resume_at_another_zero_stage_says_so(tmp_path, tiny_args, accelerator):
    """A checkpoint of another ZeRO stage is named as such, not as "corrupt or incomplete?"."""
    from mmtrain.model import build_model

    args = tiny_args()
    model = build_model(args).model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpointer = Checkpointer(Prepared(accelerator), args, trainable, CheckpointSettings(str(tmp_path), keep=2))
    path = checkpointer.save(TrainerState(epoch=0, step_in_epoch=1, global_step=1))
    manifest_file = os.path.join(path, "manifest.json")
    manifest = json.loads(open(manifest_file).read())
    manifest["zero_stage"] = 3  # as a ZeRO-3 run of the same process count writes it
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ConfigError) as caught:
        checkpointer.load(path)
    message = str(caught.value)
    assert "was written with DeepSpeed ZeRO-3 and this run uses no DeepSpeed" in message and "corrupt" not in message
