"""Every shipped Accelerate config, and the features users combine, trained for real on GPUs.

Each row launches ``accelerate launch mmtrain/train.py`` on the tiny presets (written as
Hugging Face folders) over the generated data, whose samples have many lengths: padded
to multiples of 8 they give compiled code several shapes to recompile for. A row asserts
finite losses that fall; where marked, a run killed with SIGKILL after a checkpoint and
resumed logs the same losses afterwards as the uninterrupted run; where marked, the
epoch's export reloads through ``load_pretrained`` and gives the training run's eval
loss (the training model's logits over every eval token), with MMCA still on if it was
trained with it, and for the ``mlp`` projector the LLaVA export gives the same logits in
plain transformers.

Features are spread over configs pairwise rather than as a full product, so the tier
fits one 10-minute run per machine. Two-GPU rows add ZeRO-3 with text-only batches on
some ranks (200 steps, a hang fails the row) and one GPU against two at the same
global batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.training.conftest import _free_port, common_flags, kill_after_checkpoint, kill_group, metrics, train_losses

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "accelerate_configs"
DEVICE = "cuda"  # where the tier checks exports (rows train on every GPU the launch gets)
ROW_TIMEOUT = 420  # seconds; a hung collective fails its row instead of the whole tier
SAVE_AT = 12  # the step after which resume rows are killed


@dataclass(frozen=True)
class Row:
    config: str
    features: tuple[str, ...] = ()
    flags: dict = field(default_factory=dict)
    gpus: int = 1
    mixed_precision: str | None = None  # the launcher's --mixed_precision (fp16 rows)
    resume: bool = False
    export: bool = True
    llava: bool = False
    # how close the export's eval loss (original weights, fp32) must be to training's
    export_tolerance: float = 2e-2
    env: tuple[tuple[str, str], ...] = ()  # environment of the launched runs (measurement switches)

    def launch_options(self) -> dict:
        return dict(config=self.config, processes=self.gpus, mixed_precision=self.mixed_precision, env=dict(self.env))

    @property
    def name(self) -> str:
        return f"{self.gpus}gpu-{self.config}" + "".join(f"+{f}" for f in self.features)


FEATURES = {
    "vision_lora": {"vis_lora_dim": 4},
    "mmca_compiled": {"enable_mmca_attention": "true", "torch_compile": "true"},
    "mmca_eager": {"enable_mmca_attention": "true", "torch_compile": "false"},
    "compiled": {"torch_compile": "true"},
    "packing": {"packing": "true"},
    "budget": {"max_tokens_per_batch": "512"},  # micro-batches of whole samples within 512 tokens, one row each
    "image_budget": {"max_images_per_batch": "3"},
    # Two GPUs x accumulation 2 x a 512-token budget take ~19 samples a step: 160 samples
    # end the epoch at step 8, before the resume rows' checkpoint at SAVE_AT.
    "long_epoch": {"synthetic_num_samples": "480"},
    "vision_cache": {"cache_vision_features": "true"},
    "grad_ckpt": {"gradient_checkpointing": "true"},
    "grad_ckpt_layers": {"gradient_checkpointing_layers": "2"},
    "grad_accum": {"gradient_accumulation_steps": "2"},
    "concat": {"dataset_concatenate_samples": "2"},
    "workers": {"num_workers": "2"},
    "chat": {"template": "chat"},
    "perceiver": {"vis_proj": "perceiver", "perceiver_num_queries": "8"},
    # float8 frozen Linears; every width of the tiny presets is a multiple of 16, so all convert
    "fp8": {"fp8_base": "true"},
    "fp8_vision": {"fp8_vision": "true"},
    # 4-bit NF4 frozen Linears (bitsandbytes)
    "nf4": {"quantize_base": "nf4"},
    "nf4_vision": {"quantize_vision": "nf4"},
    # the embedded default's way: preset names, built in the process (not loaded from folders)
    "presets": {"lm_model_name_or_path": "tiny-llama", "vision_model_name_or_path": "tiny-clip"},
    # Preference tuning on pairs the row writes (``_pairs_dataset``): the reference is the
    # starting model, so the first step's margins are 0, and the pairs are learnable from
    # their text alone, so a few dozen steps take held-out preference accuracy to ~100%.
    "dpo": {"objective": "dpo", "dpo_beta": "0.5", "eval_generate": "0", "eval_steps": "9"},
    "ipo_sft": {"dpo_loss": "ipo", "dpo_sft_weight": "0.5"},
    "projector_only": {"lang_lora_dim": "0"},  # the projector and new rows swapped for the reference
    "halves": {"dpo_share_prompt": "false"},
    "eager": {"torch_compile": "false"},  # a pair's two halves as rows (the default computes its prompt once)
    # AnyRes tiles on images of five aspect ratios (the row writes them: ``row_data``)
    "anyres": {"anyres_max_tiles": "4"},
    # SigLIP2 read at each image's own aspect ratio (NaFlex), on the same images
    "native": {"vision_model_name_or_path": "tiny-siglip2", "vision_max_patches": "48"},
    "precompute_ref": {"precompute_ref": "true"},  # the reference's log-probabilities computed once, read back on resume
    # flex attention's document mask: what packed rows take where FlashAttention-2 cannot run
    "flex": {"packed_attention": "flex_attention"},
    # sequence parallelism: each row split over the two GPUs, DeepSpeed's Ulysses attention
    # around FlashAttention-2's varlen kernel (mmtrain/training/sequence_parallel.py)
    "sp2": {"sequence_parallel_size": "2"},
}


def row(config: str, *features: str, **kw) -> Row:
    flags = {}
    for f in features:
        if f != "fp16":
            flags.update(FEATURES[f])
    if "fp16" in features:
        kw["mixed_precision"] = "fp16"
    return Row(config, features, flags, **kw)


# One GPU: every config, each feature at least twice, the bug cases of the GPU issue first.
ONE_GPU = [
    row("zero3", "vision_lora", "presets", resume=True),  # buffers left on the CPU by the ZeRO-3 engine
    row("zero2", "mmca_compiled"),  # compile guards on MMCA's data-dependent shapes
    row("zero2_offload", "mmca_compiled", "vision_lora"),  # MMCA recorded in the export
    row("single_process", "compiled", "workers", llava=True, resume=True),
    row("zero0", "mmca_eager", "packing", "chat"),
    row("zero1", "grad_ckpt", "grad_accum"),
    row("zero2", "vision_lora", "grad_ckpt_layers", "compiled", resume=True),
    row("zero2", "packing", "concat", "workers"),
    row("zero2", "vision_cache", "fp16"),
    row("zero3", "mmca_eager", "packing", "perceiver"),
    row("zero3_offload", "grad_ckpt", "vision_lora", "chat"),
    row("zero0", "fp16", "grad_accum", "concat", llava=True),
    row("zero2", "budget", resume=True),  # FlashAttention-2 over the packed rows' offsets, compiled
    row("zero2", "budget", "mmca_compiled", "image_budget"),
    row("zero3", "budget", "grad_accum", "concat"),
    # Float8 trains and evaluates in float8 while the export holds the original weights, so
    # its eval loss is only float8-close to training's.
    row("zero2", "fp8", "compiled", "budget", resume=True, export_tolerance=6e-2),
    row("zero1", "fp8", "fp8_vision", "vision_lora", "grad_ckpt", "mmca_eager", export_tolerance=6e-2),
    row("single_process", "fp8", "compiled", llava=True, export_tolerance=6e-2),  # plain autocast; LLaVA from the originals
    # A 4-bit base (QLoRA). Unlike float8's, an NF4 export holds the weights the run computed
    # with (the dequantised base with LoRA merged), so the export's fp32 eval loss is as close
    # to training's bf16 one as a bfloat16 row's: the bf16 tolerance holds.
    row("zero2", "nf4", "compiled", "budget", resume=True),
    row("zero0", "nf4", "nf4_vision", "vision_lora", "grad_ckpt"),
    row("single_process", "nf4", "compiled", "grad_ckpt_layers", resume=True),  # plain autocast
    # Packed rows through flex attention's mask instead of the samples' offsets
    # (--packed_attention flex_attention; the choice on GPUs without FlashAttention-2), compiled.
    row("zero2", "budget", "compiled", "flex"),
    # Preference tuning (--objective dpo): LoRA switched off for the reference, or the
    # projector and new rows swapped back; fp16's loss scaling; accumulation; offload;
    # a token budget's micro-batches of whole pairs in one packed row.
    row("zero2", "dpo", resume=True, export=False),
    row("single_process", "dpo", "ipo_sft", "grad_ckpt", "grad_accum", export=False),
    row("zero1", "dpo", "projector_only", "fp16", export=False),
    row("zero2_offload", "dpo", "workers", resume=True, export=False),
    row("zero2", "dpo", "budget", "grad_accum", resume=True, export=False),  # whole pairs packed per micro-batch, varlen kernel
    # AnyRes tiles: each image its own grid and token count, under a token budget and resumed;
    # with vision LoRA at ZeRO-3 (every rank runs the tower on its own tiles), packed rows.
    row("zero2", "anyres", "budget", "compiled", resume=True),
    row("zero3", "anyres", "vision_lora", "packing"),
    row("zero2", "native", "budget", "compiled"),
    row("zero3", "dpo", "precompute_ref", resume=True, export=False),  # the table made by a ZeRO-3 engine, then no reference forward
    # DPO on a float8 or NF4 base (the reference shares it), compiled; the halves layout beside the shared prompt.
    row("zero2", "dpo", "fp8", "compiled", resume=True, export=False),
    row("single_process", "dpo", "nf4", "halves", export=False),
    row("zero2", "dpo", "eager", export=False),  # the reference and the policy through the same kernels
]

# Two GPUs: every config on two processes.
TWO_GPUS = [
    row("single_process", "mmca_compiled", gpus=2),
    row("zero0", "packing", "workers", gpus=2, resume=True),
    row("zero1", "vision_lora", "grad_accum", gpus=2),
    row("zero2", "vision_cache", "fp16", gpus=2),
    row("zero2", "compiled", "grad_ckpt_layers", "concat", gpus=2),
    row("zero2_offload", "mmca_compiled", "chat", gpus=2),
    row("zero3", "vision_lora", "mmca_eager", "presets", gpus=2, resume=True),
    row("zero3_offload", "packing", "grad_ckpt", "perceiver", gpus=2),
    row("zero3", "budget", "mmca_eager", "grad_accum", "long_epoch", gpus=2, resume=True),  # the token-weighted loss across ranks
    row("zero2", "budget", "compiled", "flex", "grad_accum", gpus=2),
    # Sequence parallelism with ZeRO-3 (its shipped config), ZeRO-1 and float8, checkpointing, accumulation, resume.
    row("sp2_zero3", "sp2", "budget", "grad_ckpt", "grad_accum", gpus=2, resume=True),
    row("zero1", "sp2", "budget", "fp8", gpus=2, resume=True, export_tolerance=6e-2),
    row("zero3", "dpo", "projector_only", gpus=2, resume=True, export=False),  # each GPU swaps its share of the projector and rows
]


def _marks(r: Row):
    return [pytest.mark.gpus(r.gpus)]


def _params(rows):
    return [pytest.param(r, id=r.name, marks=_marks(r)) for r in rows]


# -- launching -----------------------------------------------------------------------
def launch(flags, *, config, processes, out, mixed_precision=None, env=None, devices=None, background=False, timeout=ROW_TIMEOUT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml")]
    cmd += ["--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(_free_port())]
    if mixed_precision:
        cmd += ["--mixed_precision", mixed_precision]
    cmd += [str(REPO / "mmtrain" / "train.py"), *flags]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    log = open(Path(out).parent / f"{Path(out).name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc if background else finish(proc, out, timeout)


def side_by_side(background: dict, foreground: dict) -> None:
    """Two launches at once (tiny models share the GPUs), each given as ``launch``'s
    arguments: either failing fails the row, and a failure of the foreground one kills
    the background one."""
    other = launch(**background, background=True)
    try:
        launch(**foreground)
    except BaseException:
        kill_group(other)
        raise
    finish(other, background["out"])


def finish(proc, out, timeout=ROW_TIMEOUT):
    """Wait for a launched run; a failure or a run past ``timeout`` (then killed) fails the row with its log's end."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"no result within {timeout} s (a hang?):\n{_tail(out)}")
    if proc.returncode != 0:
        raise AssertionError(f"training failed (exit {proc.returncode}):\n{_tail(out)}")
    return proc


def _tail(out, lines: int = 60) -> str:
    log = Path(out).parent / f"{Path(out).name}.log"
    text = log.read_text() if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _pairs_dataset(folder: Path, n: int = 160) -> Path:
    """Preference pairs over three coloured images: chosen "It is <colour>.", rejected "I cannot tell."."""
    from PIL import Image

    colors = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in colors.items():
        if not (folder / f"{name}.png").exists():
            Image.new("RGB", (64, 64), rgb).save(folder / f"{name}.png")
    records = [
        {"image": f"{name}.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}], "chosen": f"It is {name}.", "rejected": "I cannot tell."}
        for name in (list(colors)[i % 3] for i in range(n))
    ]
    path = folder / "pairs.json"
    if not path.exists():  # a resume row's two runs share it; the one started first writes it
        path.with_suffix(".tmp").write_text(json.dumps(records))
        path.with_suffix(".tmp").replace(path)
    return path


def row_data(r: Row, tmp_path: Path) -> dict:
    """Flags for the data a row writes itself (preference pairs, images of several shapes), else none."""
    if "anyres" in r.features or "native" in r.features:
        from tests.aspect_data import write_aspect_dataset

        return {"dataset_names": str(write_aspect_dataset(tmp_path / "aspects", 160))}
    return {"dataset_names": str(_pairs_dataset(tmp_path / "pairs"))} if "dpo" in r.features else {}


def assert_dpo_trained(out, r: Row) -> None:
    """The first step's policy is its reference (every margin 0); held-out pairs end preferred.

    Eager layers compute the reference (adapters off, no gradients) and the policy with the
    same kernels: margins within 1e-3 of 0 in 16-bit. Compiled layers (the default on CUDA)
    run them as two graphs, whose fusions round differently: margins of up to ~1e-2 were
    seen there, so they are held to 2e-2.
    """
    records = metrics(out)
    first = next(m for m in records if m["split"] == "train")
    tolerance = 1e-3 if r.flags.get("torch_compile") == "false" else 2e-2
    assert first["step"] == 1 and abs(first["margin"]) < tolerance, f"the first step's policy is not its reference: {first}"
    if "ipo_sft" not in r.features:  # the sigmoid loss at margin 0
        assert first["loss"] == pytest.approx(math.log(2), abs=tolerance), first
    evals = [m for m in records if m["split"] == "eval"]
    assert evals and evals[-1]["accuracy"] >= 0.9, f"held-out preference accuracy {evals[-1] if evals else None}"


def row_flags(model_folders, data_path, out, r: Row, **extra) -> list[str]:
    base = dict(
        output_dir=out,
        synthetic_num_samples=160,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        pad_to_multiple_of=8,  # several padded lengths per epoch: compiled code must recompile
        eval_generate=8,
        save_steps=SAVE_AT,
        save_total_limit=4,
        num_train_epochs=1,
        # The tiny recipe's LoRA scale (4) and beta2 (0.95), which make a 2-layer model learn
        # within one short epoch; the flags' own defaults are a real run's (LLaVA-1.5's).
        lang_lora_alpha=16,
        adam_beta2=0.95,
    )
    base.update(r.flags)
    base.update(extra)
    return common_flags(model_folders, data_path, **base)


# -- checks ----------------------------------------------------------------------------
def assert_trained(out) -> dict[int, float]:
    losses = train_losses(out)
    assert losses, f"no training losses logged:\n{_tail(out)}"
    values = [losses[s] for s in sorted(losses)]
    assert all(v == v and abs(v) != float("inf") for v in values), f"non-finite loss: {values}"
    k = max(2, len(values) // 5)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    assert last < 0.9 * first, f"the loss did not fall: first {k} mean {first:.3f}, last {k} mean {last:.3f}"
    return losses


class Interrupted:
    """A run started in the background and SIGKILLed (every process of it) once its ``SAVE_AT``
    checkpoint is complete, by a watcher thread.

    It runs beside the uninterrupted reference run, which the tiny models let share the
    GPUs: a resume row then takes two runs' time instead of three. ``stop()`` ends it when
    the reference run failed and no resume follows.
    """

    def __init__(self, flags, *, out, **launch_kw):
        self.out = out
        self.proc = launch(flags, out=out, background=True, **launch_kw)
        self._pool = ThreadPoolExecutor(1)
        self._checkpoint = self._pool.submit(kill_after_checkpoint, self.proc, out, SAVE_AT, ROW_TIMEOUT, output=lambda: _tail(out))

    def checkpoint(self) -> Path:
        try:
            return self._checkpoint.result()
        finally:
            self._pool.shutdown()

    def stop(self) -> None:
        kill_group(self.proc)
        self._pool.shutdown()


def start_interrupted(model_folders, data_path, tmp_path, r: Row) -> Interrupted:
    out = tmp_path / "resumed"
    return Interrupted(row_flags(model_folders, data_path, out, r, **row_data(r, tmp_path)), out=out, **r.launch_options())


def assert_resume_matches(model_folders, data_path, tmp_path, r: Row, interrupted: Interrupted, reference: dict[int, float]) -> None:
    out, checkpoint = interrupted.out, interrupted.checkpoint()
    launch(row_flags(model_folders, data_path, out, r, resume_from_checkpoint=checkpoint, **row_data(r, tmp_path)), out=out, **r.launch_options())
    resumed = {m["step"]: m["loss"] for m in metrics(out) if m["split"] == "train" and m["step"] > SAVE_AT}
    assert max(resumed) == max(reference), (max(resumed), max(reference))
    # GPU kernels with atomics (index_add's backward) are not bit-reproducible run to
    # run, so "the same" is bf16-close; a wrong data position or lost optimizer state
    # moves a tiny model's per-batch loss by far more.
    for step in range(SAVE_AT + 1, min(SAVE_AT + 11, max(reference) + 1)):
        assert resumed[step] == pytest.approx(reference[step], rel=2e-2, abs=2e-2), f"step {step}: resumed {resumed[step]} vs {reference[step]}"


def assert_export_reproduces_training(out, r: Row) -> Path:
    """The epoch export, reloaded, gives the eval loss the training model logged at that step."""
    from mmtrain.args import DataArguments
    from mmtrain.data import Collator, build_datasets
    from mmtrain.model.mmca import uses_mmca
    from mmtrain.model.pretrained import load_pretrained

    folder = out / "epoch-0"
    assert (folder / "mmtrain_config.json").is_file(), f"no export at {folder}"
    run = json.loads((out / "run_config.json").read_text())
    evals = [m for m in metrics(out) if m["split"] == "eval"]
    logged = evals[-1]["loss"]
    built = load_pretrained(str(folder), dtype=torch.float32, device=DEVICE)
    mmca = r.flags.get("enable_mmca_attention") == "true"
    assert uses_mmca(built.model.language_model) == mmca, f"export reloaded with MMCA {'off' if mmca else 'on'}"
    data_args = DataArguments(**run["data_args"])
    data = build_datasets(data_args, built.tokenizer, built.image_processor, built.image_tokens, seed=run["train_args"]["seed"])
    collate = Collator(built.tokenizer.pad_token_id, 8)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data.eval), 8):
            batch = collate([data.eval[i] for i in range(start, min(start + 8, len(data.eval)))])
            batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
            o = built.model(**batch)
            total += float(o.loss_sum_per_sample.double().sum())
            tokens += int(o.label_tokens_per_sample.sum())
    assert tokens == evals[-1]["label_tokens"], (tokens, evals[-1]["label_tokens"])
    # training evaluated in bf16/fp16 with LoRA unfused; the export is fp32 with LoRA fused
    assert total / tokens == pytest.approx(logged, rel=r.export_tolerance), f"export eval loss {total / tokens:.4f} vs training {logged:.4f}"
    return folder


LLAVA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText
    folder, inputs, out = sys.argv[1:4]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    data = torch.load(inputs)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"].to(device), pixel_values=data["pixel_values"].to(device)).logits
    assert not any(name.startswith("mmtrain") for name in sys.modules), "mmtrain was imported"
    torch.save(logits.cpu(), out)
    """
)


def assert_llava_export_matches(folder: Path, tmp_path: Path) -> None:
    from mmtrain.model.pretrained import load_pretrained

    llava = tmp_path / "llava"
    proc = subprocess.run([sys.executable, "-m", "mmtrain.export", "--model", str(folder), "--format", "llava", "--out", str(llava)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = load_pretrained(str(folder), dtype=torch.float32, device=DEVICE)
    ids = [3, *built.image_tokens.span(), 7, 5, 6, 8, 9]
    size = built.model.vision.image_size
    torch.manual_seed(0)
    ids, pixels = torch.tensor([ids]), torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = built.model(ids.to(DEVICE), pixel_values=pixels.to(DEVICE), return_logits=True).logits.cpu()
    torch.save({"input_ids": ids, "pixel_values": pixels}, tmp_path / "inputs.pt")
    (tmp_path / "llava_check.py").write_text(LLAVA_SCRIPT)
    proc = subprocess.run([sys.executable, str(tmp_path / "llava_check.py"), str(llava), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    vocab = built.image_tokens.original_vocab_size
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=1e-3, atol=1e-3)


# -- the rows --------------------------------------------------------------------------
def _run_row(r: Row, model_folders, data_path, tmp_path, record) -> None:
    record(r)
    out = tmp_path / "run"
    interrupted = start_interrupted(model_folders, data_path, tmp_path, r) if r.resume else None
    try:
        launch(row_flags(model_folders, data_path, out, r, **row_data(r, tmp_path)), out=out, **r.launch_options())
        losses = assert_trained(out)
        if "dpo" in r.features:
            assert_dpo_trained(out, r)
        if "fp8" in r.features:
            log = (out.parent / f"{out.name}.log").read_text()
            assert "float8 base (--fp8_base): 28 frozen Linear layers hold float8 weights" in log, _tail(out)  # 4 layers x 7
            assert "stay bfloat16" not in log
            if "fp8_vision" in r.features:
                assert "float8 vision (--fp8_vision):" in log
        if "nf4" in r.features:
            log = (out.parent / f"{out.name}.log").read_text()
            assert "nf4 base (--quantize_base nf4): 28 frozen Linear layers hold 4-bit NF4 weights" in log, _tail(out)  # 4 layers x 7
            if "nf4_vision" in r.features:
                assert "nf4 vision (--quantize_vision nf4):" in log
        if r.export:
            folder = assert_export_reproduces_training(out, r)
            if r.llava:
                assert_llava_export_matches(folder, tmp_path)
    except BaseException:
        if interrupted:
            interrupted.stop()
        raise
    if interrupted:
        assert_resume_matches(model_folders, data_path, tmp_path, r, interrupted, losses)


@pytest.fixture
def record(request):
    def _record(r: Row, **extra):
        request.node.user_properties.append(("row", {"config": r.config, "features": list(r.features) + ([f"mixed_precision={r.mixed_precision}"] if r.mixed_precision else []), "gpus": r.gpus, "resume": r.resume, "export": r.export, "llava": r.llava, **extra}))

    return _record


@pytest.mark.parametrize("r", _params(ONE_GPU))
def test_one_gpu(r, model_folders, data_path, tmp_path, record):
    _run_row(r, model_folders, data_path, tmp_path, record)


@pytest.mark.parametrize("r", _params(TWO_GPUS))
def test_two_gpus(r, model_folders, data_path, tmp_path, record):
    _run_row(r, model_folders, data_path, tmp_path, record)


def _mixed_dataset(folder: Path, n: int = 420, text_only: bool = True) -> Path:
    """Alternating image and text-only samples: at batch 1, ranks often differ in modality.

    ``text_only=False``: image samples only, all of one length (each color is one token)."""
    from PIL import Image

    colors = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40)}
    for name, rgb in colors.items():
        Image.new("RGB", (64, 64), rgb).save(folder / f"{name}.png")
    records = []
    for i in range(n):
        name = list(colors)[i % 3]
        if i % 2 and text_only:
            records.append({"conversations": [{"from": "human", "value": "What number comes after one?"}, {"from": "gpt", "value": "two"}]})
        else:
            records.append({"image": f"{name}.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": name}]})
    path = folder / "mixed.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.gpus(2)
@pytest.mark.parametrize("vision_lora", [False, True], ids=["frozen_vision", "vision_lora"])
def test_zero3_mixed_modality_200_steps_and_one_gpu_equivalence(vision_lora, model_folders, data_path, tmp_path, record):
    """ZeRO-3, batch 1, text-only batches on some ranks: 200 steps, no hang; the first 50
    losses equal one GPU's at the same global batch (one process, accumulation 2)."""
    r = Row("zero3", ("mixed_modality_200_steps",) + (("vision_lora",) if vision_lora else ()), gpus=2, export=False)
    record(r)
    dataset = _mixed_dataset(tmp_path)
    extra = dict(dataset_names=str(dataset), per_device_train_batch_size=1, max_steps=200, eval_ratio=0.05, eval_generate=0, save_steps=0, export_each_epoch="false", lr_scheduler_type="constant",
                 num_warmup_steps=5)  # a count: a warmup ratio would differ between the 200- and the 50-step run
    if vision_lora:
        extra["vis_lora_dim"] = 4
    two, one = tmp_path / "two", tmp_path / "one"
    # the one-GPU run beside the two-GPU one (tiny models share GPU 0)
    side_by_side(
        dict(flags=common_flags(model_folders, data_path, output_dir=one, **{**extra, "max_steps": 50, "gradient_accumulation_steps": 2}),
             config="zero3", processes=1, out=one, devices="0"),
        dict(flags=common_flags(model_folders, data_path, output_dir=two, **extra), config="zero3", processes=2, out=two),
    )
    losses1, losses2 = train_losses(one), train_losses(two)
    assert max(losses2) == 200
    curve1, curve2 = [losses1[step] for step in range(1, 51)], [losses2[step] for step in range(1, 51)]
    record(r, losses_one_gpu=curve1, losses_two_gpus=curve2)
    # Same weights and samples, but bf16 sums in another order (NCCL across two ranks against
    # accumulation on one), and at batch 1 the difference compounds step by step. So: the first
    # step alike, each step within 2% for the first 20, and the curve (means of 10 steps) within
    # 2% over all 50. A wrong sample, scale or rank split shows at once, well beyond these.
    assert curve1[0] == pytest.approx(curve2[0], rel=5e-3), f"step 1: one GPU {curve1[0]} vs two {curve2[0]}"
    for step in range(1, 21):
        assert losses1[step] == pytest.approx(losses2[step], rel=2e-2, abs=2e-2), f"step {step}: one GPU {losses1[step]} vs two {losses2[step]}"
    for start in range(0, 50, 10):
        mean1, mean2 = sum(curve1[start:start + 10]) / 10, sum(curve2[start:start + 10]) / 10
        assert mean1 == pytest.approx(mean2, rel=2e-2), f"steps {start + 1}-{start + 10}: mean loss one GPU {mean1} vs two {mean2}"


def test_one_gpu_budget_rows_of_equal_samples_train_as_flex_attention_does(model_folders, tmp_path, record):
    """Image samples of one length fill each budget row exactly, so the rows go through dense
    causal attention (mmtrain/model/varlen_attention.py) instead of the offsets: compiled at
    ZeRO-2, the losses are flex attention's on the same batches."""
    r = Row("zero2", ("budget", "compiled", "equal_samples"), export=False)
    record(r)
    folder = tmp_path / "data"
    folder.mkdir()
    dataset = _mixed_dataset(folder, n=320, text_only=False)
    extra = dict(dataset_names=str(dataset), max_tokens_per_batch=512, pad_to_multiple_of=1, torch_compile="true", max_steps=30,
                 eval_ratio=0.05, eval_generate=0, save_steps=0, export_each_epoch="false")
    dense, flex = tmp_path / "dense", tmp_path / "flex"
    side_by_side(
        dict(flags=common_flags(model_folders, tmp_path, output_dir=flex, packed_attention="flex_attention", **extra), config="zero2",
             processes=1, out=flex),
        dict(flags=common_flags(model_folders, tmp_path, output_dir=dense, **extra), config="zero2", processes=1, out=dense),
    )
    got, want = assert_trained(dense), assert_trained(flex)
    assert got.keys() == want.keys()
    for step in got:  # bf16 kernels of different tiling: close, not equal
        assert got[step] == pytest.approx(want[step], rel=2e-2, abs=2e-2), f"step {step}: dense {got[step]} vs flex {want[step]}"


@pytest.mark.gpus(2)
@pytest.mark.parametrize("config, written_on, resumed_on", [("zero2", 2, 1), ("zero3", 1, 2)], ids=["zero2-2to1", "zero3-1to2"])
def test_resume_on_another_gpu_count(config, written_on, resumed_on, model_folders, data_path, tmp_path, record):
    """A checkpoint of 2 GPUs x accumulation 1 resumes on 1 GPU x accumulation 2 and back: the losses go on as the uninterrupted run's."""
    r = Row(config, (f"resume {written_on}->{resumed_on} GPUs",), gpus=2, export=False)
    record(r)

    def accumulation(gpus):
        return {"gradient_accumulation_steps": 2 // gpus}

    extra = dict(synthetic_num_samples=160, eval_generate=0, save_steps=SAVE_AT, save_total_limit=4, export_each_epoch="false", record_samples="true")
    first = tmp_path / "first"
    launch(common_flags(model_folders, data_path, output_dir=first, **extra, **accumulation(written_on)), config=config,
           processes=written_on, out=first, devices="0" if written_on == 1 else None)
    checkpoint = first / "checkpoints" / f"step-{SAVE_AT:08d}"
    resumed = tmp_path / "resumed"
    launch(common_flags(model_folders, data_path, output_dir=resumed, resume_from_checkpoint=checkpoint, **extra, **accumulation(resumed_on)),
           config=config, processes=resumed_on, out=resumed, devices="0" if resumed_on == 1 else None)
    reference, got = train_losses(first), train_losses(resumed)
    assert min(got) == SAVE_AT + 1 and max(got) == max(reference)
    for step in got:
        assert got[step] == pytest.approx(reference[step], rel=2e-2, abs=2e-2), f"step {step}: resumed {got[step]} vs {reference[step]}"


@pytest.mark.gpus(2)
def test_7b_preset_starts_in_seconds_at_zero2(tmp_path, data_path, record):
    """ref-7b's presets at ZeRO-2 on two processes: the build used to take minutes on the CPU."""
    r = Row("zero2", ("llama-2-7b+clip-vit-large-patch14-336 presets", "startup"), gpus=2, export=False)
    out = tmp_path / "run"
    flags = common_flags(
        {"tiny-llama": "llama-2-7b", "tiny-clip": "clip-vit-large-patch14-336"}, data_path, output_dir=out,
        synthetic_num_samples=160, per_device_train_batch_size=2, lang_lora_dim=16, max_steps=3, eval_generate=0,
        export_each_epoch="false", logging_steps=1,
    )
    start = time.time()
    launch(flags, config="zero2", processes=2, out=out)
    seconds = time.time() - start
    record(r, wall_seconds=round(seconds, 1))
    assert max(train_losses(out)) == 3
    assert seconds < 240, f"3 steps of the 7B presets took {seconds:.0f} s from launch"


def _stream_shards(folder: Path, shards: int = 4) -> tuple[str, str]:
    """The generated dataset as JSONL shards beside its images, and an eval file: (train glob, eval file)."""
    from mmtrain.data.synthetic import generate_synthetic

    root = Path(generate_synthetic(str(folder / "synthetic"), 400, seed=3)).parent
    records = json.loads((root / "train.json").read_text())
    train, evals = records[:360], records[360:]
    for s in range(shards):
        (root / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train[s::shards]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return str(root / "part-*.jsonl"), str(root / "eval.jsonl")


@pytest.mark.parametrize("gpus", [1, pytest.param(2, marks=pytest.mark.gpus(2))], ids=["1gpu", "2gpu"])
def test_streaming_budget_workers_kill_and_resume(gpus, model_folders, data_path, tmp_path, record):
    """Streamed shards under a token budget, with loader workers (compiled, flex attention): the
    loss falls, and a run killed after its step-12 checkpoint and resumed follows the uninterrupted one."""
    r = Row("zero2", ("streaming", "budget", "workers", "compiled"), gpus=gpus, export=False, resume=True)
    record(r)
    train_glob, eval_file = _stream_shards(tmp_path)

    def flags(out, **extra):
        base = common_flags(
            model_folders, data_path, output_dir=out, max_steps=24, save_steps=SAVE_AT, save_total_limit=4, eval_generate=0,
            export_each_epoch="false", max_tokens_per_batch=512, num_workers=2, torch_compile="true", pad_to_multiple_of=8,
            num_train_epochs=3, **extra,
        )
        return base + ["--streaming", "--shuffle_buffer_size", "32", "--dataset_names", train_glob, "--eval_dataset_names", eval_file]

    devices = "0" if gpus == 1 else None
    reference, out = tmp_path / "uninterrupted", tmp_path / "resumed"
    interrupted = Interrupted(flags(out), out=out, config=r.config, processes=gpus, devices=devices)  # beside the reference run
    try:
        launch(flags(reference), config=r.config, processes=gpus, out=reference, devices=devices)
        losses = assert_trained(reference)
    except BaseException:
        interrupted.stop()
        raise
    launch(flags(out, resume_from_checkpoint=interrupted.checkpoint()), config=r.config, processes=gpus, out=out, devices=devices)
    resumed = {m["step"]: m["loss"] for m in metrics(out) if m["split"] == "train" and m["step"] > SAVE_AT}
    assert max(resumed) == max(losses), (max(resumed), max(losses))
    for step in range(SAVE_AT + 1, max(losses) + 1):
        assert resumed[step] == pytest.approx(losses[step], rel=2e-2, abs=2e-2), f"step {step}: resumed {resumed[step]} vs {losses[step]}"


@pytest.mark.gpus(2)
def test_two_gpus_splitting_each_row_train_as_one_gpu(model_folders, data_path, tmp_path, record):
    """--sequence_parallel_size 2 on two GPUs against one GPU on the same budget rows: each
    row computed in two halves (Ulysses around FlashAttention-2's varlen kernel) or whole
    (the varlen kernel alone). bf16 in another order: step 1 within 5e-3, each step within 2%."""
    r = Row("zero2", ("sp2", "budget", "equivalence"), gpus=2, export=False)
    record(r)
    extra = dict(max_tokens_per_batch=512, max_steps=20, eval_generate=0, save_steps=0, export_each_epoch="false",
                 lr_scheduler_type="constant", num_warmup_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    side_by_side(
        dict(flags=common_flags(model_folders, data_path, output_dir=one, **extra), config="zero2", processes=1, out=one, devices="0"),
        dict(flags=common_flags(model_folders, data_path, output_dir=two, sequence_parallel_size=2, **extra), config="zero2", processes=2, out=two),
    )
    losses1, losses2 = assert_trained(one), assert_trained(two)
    record(r, losses_one_gpu=[losses1[s] for s in sorted(losses1)], losses_two_gpus=[losses2[s] for s in sorted(losses2)])
    assert losses1.keys() == losses2.keys()
    assert losses1[1] == pytest.approx(losses2[1], rel=5e-3), f"step 1: whole rows {losses1[1]} vs split {losses2[1]}"
    for step in losses1:
        assert losses1[step] == pytest.approx(losses2[step], rel=2e-2, abs=2e-2), f"step {step}: whole {losses1[step]} vs split {losses2[step]}"
