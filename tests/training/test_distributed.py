"""DeepSpeed for real, two processes on CPU: stage parity, mixed modality at ZeRO-3, exact resume."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from .conftest import common_flags, kill_after_checkpoint, launch, metrics, train_losses

pytestmark = pytest.mark.slow

STEPS = 8
SAVE_EVERY = 3


def _flags(model_folders, data_path, out, **extra):
    return common_flags(model_folders, data_path, output_dir=out, max_steps=STEPS, save_steps=SAVE_EVERY, **extra)


@pytest.fixture(scope="module")
def full_runs(model_folders, data_path, tmp_path_factory):
    """One uninterrupted run per stage; other tests compare against these."""
    runs = {}

    def get(config):
        if config not in runs:
            out = tmp_path_factory.mktemp(config) / "run"
            launch(_flags(model_folders, data_path, out), config=f"{config}.yaml", num_processes=2)
            runs[config] = out
        return runs[config]

    return get


def test_zero_stages_give_the_same_losses(full_runs, model_folders, data_path, tmp_path):
    """zero0/zero2/zero3/zero3_offload: same data, same model -> the same first losses (bf16 tolerance)."""
    reference = train_losses(full_runs("zero0"))
    assert sorted(reference) == list(range(1, STEPS + 1))
    for config in ("zero2", "zero3_offload"):
        out = tmp_path / config
        launch(common_flags(model_folders, data_path, output_dir=out, max_steps=4, eval_generate=0), config=f"{config}.yaml", num_processes=2)
        losses = train_losses(out)
        for step in range(1, 5):
            assert losses[step] == pytest.approx(reference[step], rel=2e-2), (config, step)
    zero3 = train_losses(full_runs("zero3"))
    for step in range(1, 5):
        assert zero3[step] == pytest.approx(reference[step], rel=2e-2), ("zero3", step)
    # the loss moved: the runs actually trained
    assert reference[STEPS] < reference[1]


def test_zero3_mixed_text_and_image_batches_with_vision_lora(model_folders, data_path, tmp_path):
    """One image per batch on one rank, none on the other: no hang, with the vision encoder in the engine."""
    records = []
    for i in range(32):
        if i % 2:
            records.append({"conversations": [{"from": "human", "value": "What number comes after one?"}, {"from": "gpt", "value": "two"}]})
        else:
            records.append({"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]})
    Image.new("RGB", (64, 64), (220, 40, 40)).save(tmp_path / "img.png")
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    out = tmp_path / "run"
    flags = common_flags(
        model_folders, data_path, output_dir=out, dataset_names=str(tmp_path / "mixed.json"), per_device_train_batch_size=1,
        max_steps=10, vis_lora_dim=2, eval_generate=2, eval_ratio=0.25,
    )
    proc = launch(flags, config="zero3.yaml", num_processes=2, timeout=600)
    assert "training finished at step 10" in proc.stdout

    # 24 training samples over 2 ranks is 12 batches an epoch: step 10 stops inside the
    # first epoch, so the run ends with a checkpoint (no epoch export).
    manifest = json.loads((out / "checkpoints" / "step-00000010" / "manifest.json").read_text())
    assert manifest["zero_stage"] == 3 and manifest["num_processes"] == 2
    assert any(name.startswith("vision_encoder.") and "lora_" in name for name in manifest["trainable_parameters"])
    logged = metrics(out)
    train = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) for r in train)
    evals = [r for r in logged if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [10] and math.isfinite(evals[0]["loss"]) and evals[0]["questions"] == 2
    # tokens_seen sums both ranks' tokens (one question each answered, too: the two are shared out)
    assert [r["tokens_seen"] for r in train] == list(itertools.accumulate(round(r["tokens_per_step"]) for r in train))
    state = json.loads((out / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["tokens_seen"] == train[-1]["tokens_seen"]

    # Each logged step sums both ranks' tokens and samples (one each): their ratio gives
    # the step's two sample lengths, which tell image samples from text-only ones.
    text, image = _sample_lengths(model_folders, tmp_path / "mixed.json")
    assert image > text
    totals = [round(2 * r["tokens_per_s"] / r["samples_per_s"]) for r in train]
    assert set(totals) <= {2 * text, text + image, 2 * image}, (totals, text, image)
    assert text + image in totals, f"no step had an image batch on one rank and a text-only batch on the other: {totals}"
    # a step of two image batches and one of two text-only batches: each rank ran both kinds
    assert 2 * image in totals and 2 * text in totals, (totals, text, image)


def _sample_lengths(model_folders, path) -> tuple[int, int]:
    """Token lengths (image tokens included) of the text-only and of the image samples of ``path``."""
    from mmtrain.args import DataArguments, ModelArguments
    from mmtrain.data import build_datasets
    from mmtrain.model import build_model

    built = build_model(
        ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"])
    )
    data = build_datasets(
        DataArguments(dataset_names=[str(path)], eval_ratio=0.25), built.tokenizer, built.image_processor, built.image_tokens
    )
    by_kind = {True: set(), False: set()}
    for i in range(len(data.train)):
        item = data.train[i]
        by_kind[bool(item["pixel_values"].shape[0])].add(len(item["input_ids"]))
    assert len(by_kind[False]) == 1 and len(by_kind[True]) == 1, by_kind
    return by_kind[False].pop(), by_kind[True].pop()


@pytest.mark.parametrize("config", ["zero0", "zero3"])
def test_killed_and_resumed_run_is_bit_identical(full_runs, model_folders, data_path, tmp_path, config):
    reference_dir = full_runs(config)
    out = tmp_path / "run"
    proc = launch(_flags(model_folders, data_path, out), config=f"{config}.yaml", num_processes=2, background=True)
    # The named checkpoint, not "latest": a fast run may pass later ones before the kill lands.
    checkpoint = kill_after_checkpoint(proc, out, SAVE_EVERY)
    launch(_flags(model_folders, data_path, out, resume_from_checkpoint=checkpoint), config=f"{config}.yaml", num_processes=2)

    reference = train_losses(reference_dir)
    resumed = {r["step"]: r["loss"] for r in metrics(out) if r["split"] == "train" and r["step"] > SAVE_EVERY}
    last = max(resumed)
    assert last == STEPS
    for step in range(SAVE_EVERY + 1, STEPS + 1):
        assert resumed[step] == reference[step], f"step {step}: {resumed[step]} != {reference[step]}"
    # final trainable state (weights, fp32 master copies, Adam moments of every rank's
    # partition, as DeepSpeed saved them) is bit-identical
    name = f"step-{STEPS:08d}"
    a = _checkpoint_tensors(reference_dir / "checkpoints" / name)
    b = _checkpoint_tensors(out / "checkpoints" / name)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _checkpoint_tensors(checkpoint: Path) -> dict:
    """Every tensor in the DeepSpeed shards of a checkpoint, keyed by file and path inside it."""
    found = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for path in sorted((checkpoint / "pytorch_model").glob("*.pt")):
        walk(path.name, torch.load(path, map_location="cpu", weights_only=False))
    return found


def test_zero3_with_fused_lora_and_compile_matches_zero0(full_runs, model_folders, data_path, tmp_path):
    """ZeRO-3's speed path: decoder layers gathered whole, fused LoRA and compiled layers, same losses as ZeRO-0."""
    out = tmp_path / "run"
    flags = common_flags(model_folders, data_path, output_dir=out, max_steps=4, eval_generate=0, torch_compile="true", fused_lora="true")
    proc = launch(flags, config="zero3.yaml", num_processes=2)
    log = proc.stdout + proc.stderr
    assert "each gathered whole" in log and "LM decoder layers compiled" in log, log[-3000:]
    assert "adapted layers add their low-rank term inside the base matrix product" in log, log[-3000:]
    reference = train_losses(full_runs("zero0"))
    losses = train_losses(out)
    for step in range(1, 5):
        assert losses[step] == pytest.approx(reference[step], rel=2e-2), step


def test_loader_workers_default_follows_the_device_and_the_cores(monkeypatch):
    """-1 is 4 workers per GPU process when the cores allow, fewer when they do not, 0 on CPU and for streams; a count given is kept."""
    import torch

    from mmtrain.training import distributed

    cuda = torch.device("cuda")
    monkeypatch.setattr(distributed, "_usable_cores", lambda: 16)
    assert distributed.loader_workers(-1, cuda) == distributed.AUTO_WORKERS == 4
    assert distributed.loader_workers(-1, cuda, local_processes=8) == 1  # 2 cores each: one for training, one worker
    assert distributed.loader_workers(-1, cuda, streaming=True) == 0
    assert distributed.loader_workers(-1, torch.device("cpu")) == 0
    assert distributed.loader_workers(6, torch.device("cpu")) == 6
    monkeypatch.setattr(distributed, "_usable_cores", lambda: 1)
    assert distributed.loader_workers(-1, cuda) == 0
