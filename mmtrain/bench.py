"""Training throughput on one GPU: mmtrain's real training path beside a plain transformers + peft loop.

    python -m mmtrain.bench --out benchmarks/results/bench_h100.json       # ref-7b, one GPU
    python -m mmtrain.bench --lm tiny-llama --vision tiny-clip --steps 2   # CPU smoke test

**The workload** (ref-7b by default): the ``llama-2-7b`` and ``clip-vit-large-patch14-336``
presets with random weights, MLP projector, LoRA rank 16 on every Linear under
``model.layers.``, the new image tokens' embedding rows trainable, bf16. Each synthetic
sample is one image (576 image tokens between ``<im_start>`` and ``<im_end>``) and a
number of text tokens drawn uniformly from ``--text_tokens`` (64-1024, seeded); the last
``--label_fraction`` of the text carries labels (the answer). Images are random pixels.

**mmtrain** runs through the trainer's own code, single process: the Accelerator from
``distributed.make_accelerator`` with Accelerate's DeepSpeed plugin (configured through
the same environment ``accelerate launch --config_file accelerate_configs/zeroN.yaml``
sets; ZeRO stage 2 unless ``--zero_stage``), ``setup.build_for_training``,
``setup.make_loader`` with the trainer's ``Collator``, ``setup.make_optimizer_and_schedule``,
``accelerator.prepare``, and every step is ``Loop._micro_step`` itself (forward,
``accelerator.backward``, DeepSpeed's step with clipping, scheduler).

**The plain loop** is what a user would write without mmtrain, on the same language model
and the same samples, in the same process (run first, then freed): ``AutoModelForCausalLM``
in bf16 (SDPA), ``peft.get_peft_model`` with LoRA 16 on all linear layers, fused torch
AdamW, gradient clipping, ``model(input_ids, attention_mask, labels)`` on right-padded
batches (image positions are ordinary token ids there; there is no vision tower). It
tries micro-batches 4, 2, 1 and keeps the first that does not run out of memory.

**Figures**: tokens/s counts every LM input token (image tokens included, padding
excluded), over the timed steps only (after ``--warmup`` untimed steps), with
``torch.cuda.synchronize()`` around the timed region; data loading is inside it, as in
training. Peak memory is ``torch.cuda.max_memory_allocated()`` from just before the first
(warm-up) step to the end. FLOPs per sample of ``s`` tokens (the project's convention):
``4·N·s`` with N the base LM's parameter count, frozen weights and embeddings included
(forward 2N, backward 2N for activation gradients; frozen weights need no weight
gradient; recomputation from checkpointing and the vision encoder's forward are not
counted), plus attention ``4·s²·h·L`` (h width, L layers): the two s×s products of a
layer (QKᵀ and PV), 2·s²·h each over the full square, counted once. A causal kernel does
half of that forward, and its backward (gradients of Q, K and V through both products)
twice its forward, so a causal forward + backward count is 3 × 2·s²·h·L = ``6·s²·h·L``;
MFU under that count is reported beside as ``mfu_attention_6``. MFU is
achieved FLOP/s over ``--peak_tflops`` (989, H100 SXM dense bf16). mmtrain runs the LM
head at label positions only, yet is credited 4N per token like the plain loop.

Extra flags after the bench's own are handed to mmtrain's parser unchanged (any model,
data or training flag of ``mmtrain.train``, e.g. ``--attn_implementation eager``), so
speed options reach the same code the trainer runs.

Writes a JSON file (``--out``) with the device, versions, git commit, flags, command,
both systems' figures and their ratio, and a profiler summary (top kernels grouped as
attention, matrix products, loss, optimizer, copies, other, plus host gaps and data
time) when asked for or when a target is missed on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

PEAK_TFLOPS_H100 = 989.0
TARGET_TOKENS_PER_S = 16_000  # ref-7b, bf16, one H100 (issue: speed on one H100)
TARGET_RATIO = 2.0  # over the plain loop measured in the same run
REF_7B = ("llama-2-7b", "clip-vit-large-patch14-336")
OFFLOADS = ("none", "optimizer", "optimizer+params")


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m mmtrain.bench",
        description=__doc__.splitlines()[0],
        epilog="Unrecognised flags are passed to mmtrain's own parser (model/data/training flags of mmtrain.train).",
    )
    p.add_argument("--lm", default=REF_7B[0], help="language model: preset or local folder (default: llama-2-7b)")
    p.add_argument("--vision", default=REF_7B[1], help="vision encoder: preset or local folder")
    p.add_argument("--projector", default="mlp", help="--vis_proj of mmtrain")
    p.add_argument("--lora_rank", type=int, default=16, help="LoRA rank on the LM (mmtrain --lang_lora_dim; the plain loop too)")
    p.add_argument("--lora_scope", default="model.layers.", help="mmtrain --lang_lora_module_name")
    p.add_argument("--micro_batch", type=int, default=4, help="mmtrain's micro-batch")
    p.add_argument("--zero_stage", default="2", choices=("none", "0", "1", "2", "3"),
                   help="DeepSpeed ZeRO stage; none: Accelerate without DeepSpeed (accelerate_configs/single_process.yaml, bf16 autocast)")
    p.add_argument("--offload", default="none", choices=OFFLOADS, help="DeepSpeed offload: optimizer (stage 1-3), optimizer+params (stage 3)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="mmtrain with full activation checkpointing")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--text_tokens", type=int, nargs=2, default=(64, 1024), metavar=("MIN", "MAX"), help="text tokens per sample, uniform")
    p.add_argument("--label_fraction", type=float, default=0.25, help="share of the text tokens that carry labels (at the end)")
    p.add_argument("--seq_len", type=int, default=2048, help="longest allowed sample (image span + text)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per epoch (the timed set holds steps x micro_batch samples)")
    p.add_argument("--warmup", type=int, default=6, help="untimed steps first, on other samples (compilation and new shapes settle here)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the timed set (figures per epoch and overall)")
    p.add_argument("--plain", default="auto", choices=("auto", "skip", "only"),
                   help="run the plain transformers + peft loop (auto) or not; 'only': the plain loop alone, the result to --out")
    p.add_argument("--plain_batches", type=int, nargs="+", default=[4, 2, 1], help="plain loop micro-batches, first that fits wins")
    p.add_argument("--plain_steps", type=int, default=None, help="timed steps of the plain loop (default: as many samples as mmtrain)")
    p.add_argument("--profile", default="auto", choices=("auto", "on", "off"), help="profiler summary: auto = on a GPU when a target is missed")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=PEAK_TFLOPS_H100, help="dense bf16 peak the MFU is taken against")
    p.add_argument("--build_on_device", default="auto", choices=("auto", "on", "off"),
                   help="materialise the random weights directly on the GPU (auto: on a GPU below ZeRO-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file to write")
    opts, rest = p.parse_known_args(argv)
    lo, hi = opts.text_tokens
    if not 1 <= lo <= hi:
        p.error(f"--text_tokens needs 1 <= MIN <= MAX, got {lo} {hi}")
    if opts.steps < 1 or opts.warmup < 0 or opts.micro_batch < 1 or opts.epochs < 1:
        p.error("--steps, --micro_batch and --epochs must be >= 1, --warmup >= 0")
    opts.zero_stage = None if opts.zero_stage == "none" else int(opts.zero_stage)
    if opts.offload != "none" and opts.zero_stage in (None, 0):
        p.error("--offload needs --zero_stage 1-3")
    if opts.offload == "optimizer+params" and opts.zero_stage != 3:
        p.error("--offload optimizer+params needs --zero_stage 3")
    return opts, rest


# --------------------------------------------------------------------------------------
# Synthetic samples
# --------------------------------------------------------------------------------------


class SyntheticSamples(torch.utils.data.Dataset):
    """Items in the trainer's dataset contract (``input_ids``, ``labels``, ``pixel_values``).

    Sample ``i``: ``<bos>`` ``<im_start>`` image tokens ``<im_end>`` text..., ``T_i - 1``
    random text ids after the ``<bos>`` (``T_i`` uniform in ``text_tokens``); labels on
    the last ``floor(label_fraction * T_i)`` tokens. Everything follows from ``seed``.
    """

    def __init__(self, n: int, image_tokens, text_tokens: tuple[int, int], label_fraction: float, image_size: int,
                 bos_id: int, seed: int, with_pixels: bool = True):
        self.n = n
        self.tokens = image_tokens
        self.label_fraction = label_fraction
        self.image_size = image_size
        self.bos_id = bos_id
        self.seed = seed
        self.with_pixels = with_pixels
        g = torch.Generator().manual_seed(seed)
        lo, hi = text_tokens
        self.text = torch.randint(lo, hi + 1, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return self.n

    def length(self, i: int) -> int:
        return self.tokens.span_length + self.text[i]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        t = self.text[i]
        text = torch.randint(3, self.tokens.original_vocab_size, (t - 1,), generator=g)
        ids = torch.cat([torch.tensor([self.bos_id]), torch.tensor(self.tokens.span()), text])
        labels = torch.full_like(ids, -100)
        k = int(self.label_fraction * t)
        if k:
            labels[-k:] = ids[-k:]
        if self.with_pixels:
            pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=g)
        else:
            pixels = torch.zeros(0, 3, self.image_size, self.image_size)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def image_token_layout(opts: argparse.Namespace):
    """(tokenizer, ImageTokens, image size) exactly as ``build_model`` will make them."""
    from mmtrain.args import ModelArguments
    from mmtrain.model.language import load_tokenizer
    from mmtrain.model.tokens import add_image_tokens
    from mmtrain.model.vision import load_vision_config

    vconfig = load_vision_config(opts.vision)
    if opts.projector == "perceiver":
        per_image = ModelArguments.perceiver_num_queries
    else:
        per_image = (vconfig.image_size // vconfig.patch_size) ** 2
    tokenizer = load_tokenizer(opts.lm)
    return tokenizer, add_image_tokens(tokenizer, per_image), vconfig.image_size


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def lm_shape(lm: str) -> dict:
    """Base parameter count N, width and layers of the language model (from its config, on the meta device)."""
    from transformers import AutoModelForCausalLM

    from mmtrain.model.language import load_language_config

    config = load_language_config(lm)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "hidden": config.hidden_size, "layers": config.num_hidden_layers}


def sample_flops(lengths: list[int], shape: dict, attention_coeff: float = 4.0) -> float:
    n, h, layers = shape["params"], shape["hidden"], shape["layers"]
    return sum(4.0 * n * s + attention_coeff * s * s * h * layers for s in lengths)


def figures(seconds: float, lengths: list[int], shape: dict, peak_tflops: float) -> dict:
    tokens = sum(lengths)
    flops = sample_flops(lengths, shape)
    return {
        "seconds": seconds,
        "samples": len(lengths),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": len(lengths) / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12),
        "mfu_attention_6": sample_flops(lengths, shape, 6.0) / seconds / (peak_tflops * 1e12),
    }


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "accelerate", "deepspeed"):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                module = __import__(name)
            out[name] = module.__version__
        except Exception as e:  # recorded, not fatal: the bench needs some of these anyway
            out[name] = f"unavailable: {type(e).__name__}"
    return out


def git_commit() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = {"commit": os.environ.get("MMTRAIN_GIT_COMMIT", "unknown"), "dirty": os.environ.get("MMTRAIN_GIT_DIRTY")}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout
        info["dirty"] = ",".join(line[3:] for line in status.splitlines()) or None
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_now() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_bytes": torch.cuda.memory_allocated(), "peak_allocated_bytes": torch.cuda.max_memory_allocated()}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# Profiler summary
# --------------------------------------------------------------------------------------

_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_mha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "matmul", "splitk", "gemv")),
    ("loss", ("cross_entropy", "log_softmax", "softmax", "nll_loss")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_", "clip", "norm_kernel")),
    ("copies", ("memcpy", "memset", "copy_", "cat", "index")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_steps(step, batches, steps: int) -> dict:
    """Profile ``steps`` calls of ``step(batch)``: device time by kernel group, host gaps, top ops."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    it = iter(batches)
    sync()
    wall = time.perf_counter()
    data_s = 0.0
    with profile(activities=activities) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            with record_function("data"):
                batch = next(it)
            data_s += time.perf_counter() - t
            step(batch)
        sync()
    wall = time.perf_counter() - wall
    events = prof.key_averages()
    device_events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]

    def dev_time(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    by_cat: dict[str, float] = {}
    for e in device_events:
        by_cat[_category(e.key)] = by_cat.get(_category(e.key), 0.0) + dev_time(e) / 1e6
    busy = sum(by_cat.values())
    top = sorted(device_events, key=dev_time, reverse=True)[:25]
    cpu_top = sorted(events, key=lambda e: float(getattr(e, "cpu_time_total", 0.0)), reverse=True)[:15]
    summary = {
        "steps": steps,
        "wall_s": wall,
        "device_busy_s": busy,
        "host_gaps_s": max(wall - busy, 0.0),
        "data_s": data_s,
        "device_s_by_group": {k: round(v, 6) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "device_share_by_group": {k: round(v / busy, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])} if busy else {},
        "top_kernels": [
            {"name": e.key[:160], "group": _category(e.key), "calls": int(e.count), "device_ms": round(dev_time(e) / 1e3, 3)} for e in top
        ],
        "top_host_ops": [
            {"name": e.key[:160], "calls": int(e.count), "cpu_total_ms": round(float(e.cpu_time_total) / 1e3, 3)} for e in cpu_top
        ],
    }
    sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    try:
        summary["table"] = events.table(sort_by=sort_key, row_limit=25, max_name_column_width=60)
    except Exception as e:  # the table is a convenience; the numbers above are the record
        summary["table"] = f"unavailable: {e}"
    return summary


# --------------------------------------------------------------------------------------
# Timed epochs (shared by both systems)
# --------------------------------------------------------------------------------------


def timed_run(step, warm_loader, loader, lengths: list[int], epochs: int, shape: dict, peak_tflops: float, set_epoch=None) -> dict:
    """Warm up on ``warm_loader``, then time ``epochs`` passes over ``loader``.

    ``step(batch)`` returns (loss, counted tokens, padded positions), the first two
    possibly device tensors that are read only after the timed region; step times are
    therefore host-side times per step, the device being synchronised around the whole
    region. ``lengths`` are the per-sample lengths of one pass over ``loader``.
    """
    peak_reset()
    static = memory_now().get("allocated_bytes")
    warm_losses = [step(batch)[0] for batch in warm_loader]
    sync()
    warm_peak = memory_now().get("peak_allocated_bytes")
    per_epoch, step_times, losses, data_s = [], [], [], 0.0
    counted = padded = 0
    total_start = time.perf_counter()
    for epoch in range(epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        sync()
        start = time.perf_counter()
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            loss, tokens, positions = step(batch)
            t2 = time.perf_counter()
            data_s += t1 - t0
            step_times.append(t2 - t0)
            losses.append(loss)
            counted += tokens
            padded += positions
        sync()
        per_epoch.append(figures(time.perf_counter() - start, lengths, shape, peak_tflops))
    seconds = time.perf_counter() - total_start
    out = figures(seconds, lengths * epochs, shape, peak_tflops)
    losses = [float(loss) for loss in losses]
    counted = int(counted)
    out.update(
        steps=len(step_times),
        warmup_steps=len(warm_losses),
        step_s_median=statistics.median(step_times),
        step_s_mean=statistics.fmean(step_times),
        data_wait_s=data_s,
        tokens_counted_by_loop=counted,
        padded_positions=padded,
        padding_fraction=1 - counted / padded if padded else 0.0,
        loss_first=losses[0],
        loss_last=losses[-1],
        per_epoch=per_epoch if epochs > 1 else None,
    )
    if torch.cuda.is_available():
        out.update(
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            warmup_peak_allocated_bytes=warm_peak,
            static_allocated_bytes=static,
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    return out


# --------------------------------------------------------------------------------------
# The plain transformers + peft loop
# --------------------------------------------------------------------------------------


def run_plain(opts, tokenizer, image_tokens, image_size: int, shape: dict, timed_n: int, pad_to_multiple_of: int = 1) -> dict:
    """The plain loop; its batches are padded like mmtrain's (``pad_to_multiple_of``), so both see the same shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mmtrain.data import Collator
    from mmtrain.model.language import load_language_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
    config = load_language_config(opts.lm)
    config.use_cache = False
    torch.manual_seed(opts.seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank, lora_dropout=0.0, target_modules="all-linear", bias="none")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of)
    info = {
        "pad_to_multiple_of": pad_to_multiple_of,
        "model": f"AutoModelForCausalLM({opts.lm}) {opts.precision} sdpa + peft LoRA r={opts.lora_rank} all-linear, torch AdamW (fused on GPU), clip 1.0",
        "trainable_params": sum(p.numel() for p in params),
        "base_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "out_of_memory_at": [],
    }

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        out = model(**batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Device tensors, read after the timed region: a per-step .item() would make the
        # host wait for the GPU every step (as mmtrain's loop avoids too).
        return out.loss.detach(), batch["attention_mask"].sum(), batch["input_ids"].numel()

    for b in opts.plain_batches:
        steps = opts.plain_steps or max(1, math.ceil(timed_n / b))
        warm = SyntheticSamples(opts.warmup * b, image_tokens, opts.text_tokens, opts.label_fraction, image_size,
                                tokenizer.bos_token_id, opts.seed + 7919, with_pixels=False)
        timed = SyntheticSamples(steps * b, image_tokens, opts.text_tokens, opts.label_fraction, image_size,
                                 tokenizer.bos_token_id, opts.seed, with_pixels=False)
        loader = torch.utils.data.DataLoader(timed, batch_size=b, collate_fn=collator, shuffle=False)
        warm_loader = torch.utils.data.DataLoader(warm, batch_size=b, collate_fn=collator, shuffle=False)
        try:
            result = timed_run(step, warm_loader, loader, [timed.length(i) for i in range(len(timed))], opts.epochs, shape, opts.peak_tflops)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            # Near the memory limit cuBLAS may fail to get its workspace and report
            # CUBLAS_STATUS_EXECUTION_FAILED / ALLOC_FAILED instead of an out-of-memory error.
            if not isinstance(err, torch.OutOfMemoryError) and "CUBLAS_STATUS" not in str(err):
                raise
            info["out_of_memory_at"].append(b)
            info.setdefault("out_of_memory_errors", []).append(f"{type(err).__name__}: {str(err)[:200]}")
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            continue
        result["micro_batch"] = b
        info.update(result)
        info["_profile_step"] = (step, loader)
        return info
    info["error"] = f"out of memory at every micro-batch of {opts.plain_batches}"
    return info


# --------------------------------------------------------------------------------------
# mmtrain's real path
# --------------------------------------------------------------------------------------


def train_collator(built, model_args, data_args):
    """The trainer's training collator: padding, or packing / image digests when those flags are on."""
    try:
        from mmtrain.training.speedups import make_train_collator
    except ImportError:  # a checkout from before the speed flags
        from mmtrain.data import Collator

        return Collator(built.tokenizer.pad_token_id)
    return make_train_collator(built, model_args, data_args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_environment(opts) -> dict:
    """What ``accelerate launch --config_file accelerate_configs/zeroN[_offload].yaml`` puts in the environment."""
    if opts.zero_stage is None:  # single_process.yaml with bf16: plain mixed precision, one process
        return {"ACCELERATE_MIXED_PRECISION": "bf16" if opts.precision == "bf16" else "no", "ACCELERATE_USE_DEEPSPEED": "false"}
    opt_dev = "cpu" if opts.offload in ("optimizer", "optimizer+params") else "none"
    par_dev = "cpu" if opts.offload == "optimizer+params" else "none"
    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_MIXED_PRECISION": "bf16" if opts.precision == "bf16" else "no",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(opts.zero_stage),
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
        "ACCELERATE_GRADIENT_CLIPPING": "1.0",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": opt_dev,
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": par_dev,
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": str(opts.zero_stage == 3).lower(),
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": str(opts.zero_stage == 3).lower(),
        "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,offload_optimizer_device,offload_param_device,gradient_accumulation_steps,"
        "gradient_clipping,zero3_init_flag,zero3_save_16bit_model,mixed_precision",
    }
    dist = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for k, v in dist.items():
        env.setdefault(k, os.environ.get(k, v))
    env["MASTER_PORT"] = os.environ.get("MASTER_PORT", str(_free_port()))
    return env


def mmtrain_argv(opts, passthrough: list[str], output_dir: str) -> list[str]:
    total = opts.warmup + opts.steps * opts.epochs
    argv = [
        "--lm_model_name_or_path", opts.lm,
        "--vision_model_name_or_path", opts.vision,
        "--vis_proj", opts.projector,
        "--lang_lora_dim", str(opts.lora_rank),
        "--lang_lora_module_name", opts.lora_scope,
        "--per_device_train_batch_size", str(opts.micro_batch),
        "--gradient_accumulation_steps", "1",
        "--max_steps", str(total),
        "--num_train_epochs", "1",
        "--max_seq_len", str(opts.seq_len),
        "--output_dir", output_dir,
        "--overwrite_output_dir",
        "--eval_generate", "0",
        "--export_each_epoch", "False",
        "--logging_steps", str(10**9),
        "--seed", str(opts.seed),
    ]
    if opts.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    return argv + passthrough


def run_mmtrain(opts, passthrough: list[str], tokenizer, image_tokens, image_size: int, shape: dict, output_dir: str) -> dict:
    from mmtrain.args import parse_args
    from mmtrain.training.distributed import prepare_environment

    model_args, data_args, train_args = parse_args(mmtrain_argv(opts, passthrough, output_dir))
    prepare_environment()
    os.environ.update(accelerate_environment(opts))

    from accelerate.utils import set_seed

    from mmtrain.model.builder import check_model_args, count_parameters
    from mmtrain.training import distributed, setup
    from mmtrain.training.checkpoint import TrainerState
    from mmtrain.training.loop import Loop

    check_model_args(model_args)
    accelerator = distributed.make_accelerator(train_args)
    set_seed(train_args.seed)
    on_device = opts.build_on_device == "on" or (
        opts.build_on_device == "auto" and accelerator.device.type == "cuda" and distributed.zero_stage(accelerator) != 3
    )
    build_start = time.perf_counter()
    with (accelerator.device if on_device else contextlib.nullcontext()):
        built = setup.build_for_training(accelerator, model_args, train_args)
    if built.image_tokens != image_tokens:
        raise RuntimeError(f"image token layout differs from the model's: {built.image_tokens} vs {image_tokens}")
    model = built.model
    counts = {c.name: {"total": c.total, "trainable": c.trainable} for c in count_parameters(model)}

    n_timed = opts.steps * opts.micro_batch
    timed = SyntheticSamples(n_timed, image_tokens, opts.text_tokens, opts.label_fraction, image_size, tokenizer.bos_token_id, opts.seed)
    warm = SyntheticSamples(opts.warmup * opts.micro_batch, image_tokens, opts.text_tokens, opts.label_fraction, image_size,
                            tokenizer.bos_token_id, opts.seed + 7919)
    collator = train_collator(built, model_args, data_args)
    loader = setup.make_loader(timed, collator, opts.micro_batch, data_args.num_workers, shuffle=False, seed=train_args.seed)
    warm_loader = setup.make_loader(warm, collator, opts.micro_batch, data_args.num_workers, shuffle=False, seed=train_args.seed)
    optimizer, scheduler, total_steps = setup.make_optimizer_and_schedule(accelerator, model, train_args, len(loader))
    model, optimizer, warm_loader, loader, scheduler = accelerator.prepare(model, optimizer, warm_loader, loader, scheduler)
    setup.place_frozen_vision(accelerator, model)
    ready_s = time.perf_counter() - build_start
    available = dict(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=loader,
        eval_loader=None, data=None, built=built, checkpointer=None, metrics=None, state=TrainerState(),
        model_args=model_args, data_args=data_args, train_args=train_args, total_steps=total_steps,
    )
    wanted = list(inspect.signature(Loop.__init__).parameters)[1:]
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise RuntimeError(f"Loop takes arguments the bench does not know: {unknown}")
    loop = Loop(**{name: available[name] for name in wanted})

    def step(batch):
        loss, tokens, _ = loop._micro_step(batch)
        return loss, tokens, batch["input_ids"].numel()

    result = timed_run(step, warm_loader, loader, [timed.length(i) for i in range(n_timed)], opts.epochs, shape,
                       opts.peak_tflops, set_epoch=getattr(loader, "set_epoch", None))
    result.update(
        mmtrain_args={"model": asdict(model_args), "data": asdict(data_args), "train": asdict(train_args)},
        collator=type(collator).__name__,
        micro_batch=opts.micro_batch,
        zero_stage=opts.zero_stage,
        offload=opts.offload,
        gradient_checkpointing=train_args.gradient_checkpointing,
        deepspeed_config={k: v for k, v in distributed.deepspeed_plugin(accelerator).deepspeed_config.items()}
        if distributed.deepspeed_plugin(accelerator) else None,
        parameter_counts=counts,
        trainable_params=sum(c["trainable"] for c in counts.values()),
        build_and_prepare_s=ready_s,
        weights_built_on_device=on_device,
    )
    result["_profile_step"] = (step, loader)
    result["_keep"] = (accelerator, model, optimizer, loop)
    return result


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _public(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = list(sys.argv[1:] if argv is None else argv)
    opts, passthrough = parse_options(raw)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    tokenizer, image_tokens, image_size = image_token_layout(opts)
    longest = image_tokens.span_length + opts.text_tokens[1]
    if longest > opts.seq_len:
        raise SystemExit(f"samples reach {longest} tokens (image span {image_tokens.span_length} + text {opts.text_tokens[1]}) > --seq_len {opts.seq_len}")
    shape = lm_shape(opts.lm)

    result = {
        "benchmark": "mmtrain.bench",
        "workload": "ref-7b" if (opts.lm, opts.vision) == REF_7B and opts.projector == "mlp" and opts.lora_rank == 16 else "custom",
        "device": device_name(),
        "device_count": torch.cuda.device_count() if cuda else 0,
        "versions": versions(),
        "git": git_commit(),
        "command": " ".join(["python", "-m", "mmtrain.bench", *raw]),
        "flags": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()}, "mmtrain_passthrough": passthrough},
        "lm": {**shape, "image_tokens_per_sample": image_tokens.span_length},
        "flops_convention": (
            "per sample of s LM input tokens: 4*N*s + 4*s^2*h*L (N base LM parameters incl. frozen and embeddings, "
            "h hidden size, L layers); mfu_attention_6 uses 6*s^2*h*L; recomputation and the vision forward are not counted"
        ),
        "peak_tflops": opts.peak_tflops,
        "targets": {"tokens_per_s": TARGET_TOKENS_PER_S, "ratio_over_plain": TARGET_RATIO},
    }
    timed_n = opts.steps * opts.micro_batch

    plain = None
    if opts.plain == "only" or (opts.plain == "auto" and not cuda):
        from mmtrain.args import parse_args

        pad_multiple = parse_args(mmtrain_argv(opts, passthrough, "unused"))[1].padding_multiple()
        plain = run_plain(opts, tokenizer, image_tokens, image_size, shape, timed_n, pad_multiple)
        result["plain"] = _public(plain)
        if opts.profile == "on" and "_profile_step" in plain:
            result["plain"]["profile"] = _profile_or_error(*plain["_profile_step"], opts.profile_steps)
        plain.clear()  # the last references to the plain model: free it before mmtrain builds
        free_memory()
        if opts.plain == "only":
            return _write(result, opts.out, summary=f"plain loop: {result['plain'].get('tokens_per_s', 0):,.0f} tokens/s")
    elif opts.plain == "auto":
        plain = result["plain"] = plain_in_subprocesses(raw, opts.plain_batches)

    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-") as output_dir:
        mm = run_mmtrain(opts, passthrough, tokenizer, image_tokens, image_size, shape, output_dir)
        result["mmtrain"] = _public(mm)
        if plain is not None and "tokens_per_s" in result["plain"]:
            result["ratio_tokens_per_s"] = mm["tokens_per_s"] / result["plain"]["tokens_per_s"]
        missed = []
        if result["workload"] == "ref-7b" and cuda:
            if mm["tokens_per_s"] < TARGET_TOKENS_PER_S:
                missed.append(f"tokens/s {mm['tokens_per_s']:.0f} < {TARGET_TOKENS_PER_S}")
            if result.get("ratio_tokens_per_s") is not None and result["ratio_tokens_per_s"] < TARGET_RATIO:
                missed.append(f"ratio {result['ratio_tokens_per_s']:.2f} < {TARGET_RATIO}")
        result["targets"]["missed"] = missed
        if opts.profile == "on" or (opts.profile == "auto" and missed):
            result["mmtrain"]["profile"] = _profile_or_error(*mm["_profile_step"], opts.profile_steps)

    return _write(result, opts.out, summary_line(result))


def _write(result: dict, out: str | None, summary: str) -> dict:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
    print(summary, flush=True)
    return result


def plain_in_subprocesses(raw: list[str], batches: list[int]) -> dict:
    """The plain loop's batch search on a GPU, one fresh process per micro-batch.

    Running out of memory near the limit does not always raise a clean
    ``OutOfMemoryError``: cuBLAS may fail with CUBLAS_STATUS_EXECUTION_FAILED and leave
    the CUDA context unusable, which would then fail mmtrain's own run in the same
    process. A child process per attempt keeps every failure contained.
    """
    base, i = [], 0
    while i < len(raw):  # the parent's options without --out, --plain and --plain_batches
        arg = raw[i]
        name = arg.split("=", 1)[0]
        i += 1
        if name in ("--out", "--plain"):
            i += 0 if "=" in arg else 1
        elif name == "--plain_batches":
            while "=" not in arg and i < len(raw) and not raw[i].startswith("--"):
                i += 1
        else:
            base.append(arg)
    failures = []
    for b in batches:
        with tempfile.TemporaryDirectory(prefix="mmtrain-bench-plain-") as tmp:
            out = os.path.join(tmp, "plain.json")
            cmd = [sys.executable, "-m", "mmtrain.bench", *base, "--plain", "only", "--plain_batches", str(b), "--out", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            plain = json.load(open(out))["plain"] if proc.returncode == 0 and os.path.exists(out) else None
        if plain is not None and "tokens_per_s" in plain:
            plain["out_of_memory_at"] = [f["micro_batch"] for f in failures]
            plain["failed_attempts"] = failures
            return plain
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        failures.append({"micro_batch": b, "returncode": proc.returncode, "error": tail[0][:300]})
    return {"error": f"no micro-batch of {batches} ran", "failed_attempts": failures}


def _profile_or_error(step, loader, steps: int) -> dict:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    try:
        return profile_steps(step, batches, len(batches))
    except Exception as e:  # a profiler failure must not lose the measurement
        return {"error": f"{type(e).__name__}: {e}"}


def summary_line(result: dict) -> str:
    mm = result["mmtrain"]
    parts = [f"{result['device']}: mmtrain {mm['tokens_per_s']:,.0f} tokens/s, {mm['samples_per_s']:.2f} samples/s, MFU {100 * mm['mfu']:.1f}%"]
    if "peak_allocated_gib" in mm:
        parts.append(f"peak {mm['peak_allocated_gib']:.1f} GiB")
    plain = result.get("plain")
    if plain and "tokens_per_s" in plain:
        parts.append(f"plain (micro-batch {plain['micro_batch']}) {plain['tokens_per_s']:,.0f} tokens/s, MFU {100 * plain['mfu']:.1f}%"
                     + (f", peak {plain['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in plain else ""))
        parts.append(f"ratio {result['ratio_tokens_per_s']:.2f}x")
    elif plain:
        parts.append(f"plain: {plain.get('error')}")
    if result["targets"].get("missed"):
        parts.append("missed: " + "; ".join(result["targets"]["missed"]))
    return " | ".join(parts)


if __name__ == "__main__":
    main()
