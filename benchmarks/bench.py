"""Training throughput on one GPU: mmtrain's real training path beside a plain transformers + peft loop.

    python benchmarks/bench.py --out benchmarks/results/bench_h100.json        # ref-7b, one GPU
    python benchmarks/bench.py --lm tiny-llama --vision tiny-clip --steps 2    # CPU smoke test
    python benchmarks/bench.py --num_processes 1 2 --plain skip --out ...      # one and two GPUs: scaling
    python benchmarks/bench.py --max_tokens_per_batch 16384 --out ...         # micro-batches by token budget
    python benchmarks/bench.py --fp8_base --plain skip --out ...              # the frozen base in float8 (a GPU of cc >= 8.9)

**The workload** (ref-7b by default): the ``llama-2-7b`` and ``clip-vit-large-patch14-336``
presets with random weights, MLP projector, LoRA rank 16 on every Linear under
``model.layers.``, the new image tokens' embedding rows trainable, bf16. Each synthetic
sample (``workload.py``) is one image (576 image tokens between ``<im_start>`` and
``<im_end>``) and a number of text tokens drawn uniformly from ``--text_tokens`` (64-1024,
seeded); the last ``--label_fraction`` of the text carries labels (the answer). Images
are random pixels.

**mmtrain** (``mmtrain_run.py``) runs through the trainer's own code, single process:
the Accelerator from ``distributed.make_accelerator`` with Accelerate's DeepSpeed plugin
(configured through the same environment ``accelerate launch --config_file
accelerate_configs/zeroN.yaml`` sets; ZeRO stage 2 unless ``--zero_stage``),
``setup.build_for_training``, ``setup.make_loader`` with the trainer's training collator,
``EngineView``, ``setup.make_optimizer_and_schedule``, ``accelerator.prepare``, and every
step is ``Loop.train_step`` itself (forward, ``accelerator.backward``, DeepSpeed's step
with clipping, scheduler).

**The plain loop** (``plain_loop.py``) is what a user would write without mmtrain, on the
same language model and the same samples, run first and then freed (on a GPU, one fresh
process per micro-batch tried).

**Figures** (``timing.py``): tokens/s counts every LM input token (image tokens
included, padding excluded), over the timed steps only (after ``--warmup`` untimed
steps), with ``torch.cuda.synchronize()`` around the timed region; data loading is inside
it, as in training. Peak memory is ``torch.cuda.max_memory_allocated()`` from just before
the first (warm-up) step to the end. FLOPs and MFU follow the convention in ``flops.py``,
against the device's dense bf16 peak from its table (H100 SXM 989, H200 989, A100 312
TFLOP/s; ``--peak_tflops`` overrides it; no MFU on a device outside the table).

**Token budget**: ``--max_tokens_per_batch N`` (with ``--max_images_per_batch``) runs
mmtrain's budget path instead of ``--micro_batch`` samples: the timed set then holds about
``--steps`` budgets of samples, planned into micro-batches by the trainer's own sampler
and stepped through the loop's own token-weighted grouping. The plain loop trains on the
same samples, padded, at the largest of ``--plain_batches`` that fits.

**Float8 base**: ``--fp8_base`` (a training flag, passed on like the others) holds the
LM's frozen decoder-layer weights in float8 (``mmtrain/model/fp8.py``); the plain loop
stays bfloat16. MFU stays against the dense bf16 peak, so a float8 run's MFU is the
bf16-equivalent figure (the work done over what bf16 could do), not a share of the
float8 peak. The memory prediction counts the float8 weights at one byte.

**Flags**: the bench's own, plus every model, data and training flag of ``mmtrain.train``,
taken from the same dataclasses (``ModelArguments``, ``DataArguments``,
``TrainArguments``), so speed options reach the same code the trainer runs. The bench's
defaults differ from training's where its workload does (the ref-7b models, micro-batch
4, seed 0), and it sets what makes a run that only trains (``--help`` lists them: a
temporary ``--output_dir``, ``--max_steps`` of warm-up + timed steps, no eval or export).
Its earlier short names stay as aliases: ``--lm``, ``--vision``, ``--projector``,
``--lora_rank``, ``--lora_scope``, ``--micro_batch``, ``--seq_len``.

With ``--fp8_base`` on a GPU the bench also runs mmtrain in bfloat16 on the same samples
and batches (a process of its own; ``--bf16_baseline skip`` leaves it out), so one JSON
holds the plain loop, the bfloat16 run (``mmtrain_bf16``), the float8 run (``mmtrain``)
and their ratios (``fp8_over_bf16``), against the float8 targets (``FP8_TARGET_TOKENS_PER_S``).

**Several GPUs** (``--num_processes 1 2``): mmtrain runs once per count, each in a group of
processes of its own started by ``torch.distributed.run`` (one GPU each; the same harness
also runs under ``accelerate launch --num_processes N``). Each process runs ``--steps``
timed steps on its own share of the samples; the result's ``scaling`` rows give tokens/s
in total and per GPU, MFU per GPU, peak memory of every rank beside ``mmtrain.memory``'s
prediction for that GPU count (batches of the longest sample), and the scaling
efficiency (per-GPU tokens/s over the first count's).

Writes a JSON file (``--out``) with the device, versions, git commit, flags, command,
both systems' figures and their ratio, and a profiler summary (top kernels grouped as
attention, matrix products, loss, optimizer, copies, other, plus host gaps and data
time) when asked for or when a target is missed on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import typing
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):  # benchmarks/ is not a package: its modules, and this checkout's mmtrain
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from flops import CONVENTION, dense_bf16_peak, lm_shape  # noqa: E402
from mmtrain.args import ConfigError, DataArguments, ModelArguments, TrainArguments, validate_paths  # noqa: E402
from mmtrain.cli import FlagParser  # noqa: E402
from mmtrain_run import deepspeed_settings, run_mmtrain, timed_samples  # noqa: E402
from plain_loop import run_plain  # noqa: E402
from provenance import git_commit  # noqa: E402
from timing import free_memory, profile_or_error  # noqa: E402
from workload import image_token_layout, span_length  # noqa: E402

TARGET_TOKENS_PER_S = 16_000  # ref-7b, bf16, one H100 (issue: speed on one H100)
TARGET_RATIO = 2.0  # over the plain loop measured in the same run
# ref-7b with the float8 base on one H200 (issue: FP8 for the frozen base): every sample 2048 tokens, the mix
FP8_TARGET_TOKENS_PER_S = {"seq2048": 25_000, "mix": 20_000}
REF_7B = ("llama-2-7b", "clip-vit-large-patch14-336")
SCRIPT = "benchmarks/bench.py"

# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------

# Training flags the bench reads itself (the plain loop and the samples follow them too),
# by the bench's names for them: the attribute names in the result's "flags", and aliases.
SHARED = {
    "lm": "lm_model_name_or_path",
    "vision": "vision_model_name_or_path",
    "projector": "vis_proj",
    "lora_rank": "lang_lora_dim",
    "lora_scope": "lang_lora_module_name",
    "micro_batch": "per_device_train_batch_size",
    "seq_len": "max_seq_len",
    "gradient_checkpointing": "gradient_checkpointing",
    "seed": "seed",
    "num_workers": "num_workers",
}
# Where the bench's defaults differ from training's: the ref-7b workload.
BENCH_DEFAULTS = {
    "lm_model_name_or_path": REF_7B[0],
    "vision_model_name_or_path": REF_7B[1],
    "per_device_train_batch_size": 4,
    "seed": 0,
}
# A run that only trains (no eval, no export, no log line inside the timed steps); given
# before the flags passed on, as --output_dir and --max_steps are.
RUN_SETTINGS = {
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 1,
    "overwrite_output_dir": True,
    "eval_generate": 0,
    "export_each_epoch": False,
    "logging_steps": 10**9,
}
LIBRARY = ((ModelArguments, "model (mmtrain.train)"), (DataArguments, "data (mmtrain.train)"), (TrainArguments, "training (mmtrain.train)"))


@dataclass
class BenchArguments:
    zero_stage: Literal["none", "0", "1", "2", "3"] = field(
        default="2",
        metadata={"help": "DeepSpeed ZeRO stage; none: Accelerate without DeepSpeed (accelerate_configs/single_process.yaml, bf16 autocast)."},
    )
    offload: Literal["none", "optimizer", "optimizer+params"] = field(
        default="none", metadata={"help": "DeepSpeed offload: optimizer (stage 1-3), optimizer+params (stage 3)."}
    )
    precision: Literal["bf16", "fp32"] = field(default="bf16", metadata={"help": "Compute dtype of both systems."})
    text_tokens: list[int] = field(
        default_factory=lambda: [64, 1024], metadata={"help": "Text tokens per sample, uniform between the two given (MIN MAX)."}
    )
    label_fraction: float = field(default=0.25, metadata={"help": "Share of the text tokens that carry labels (at the end)."})
    steps: int = field(default=20, metadata={"help": "Timed steps per epoch (the timed set holds steps x micro-batch samples)."})
    warmup: int = field(default=6, metadata={"help": "Untimed steps first, on other samples (compilation and new shapes settle here)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the timed set (figures per epoch and overall)."})
    plain: Literal["auto", "skip", "only"] = field(
        default="auto",
        metadata={"help": "Run the plain transformers + peft loop (auto) or not; only: the plain loop alone, the result to --out."},
    )
    plain_batches: list[int] = field(
        default_factory=lambda: [8, 6, 4, 2, 1], metadata={"help": "Plain loop micro-batches, the first that fits wins."}
    )
    plain_steps: Optional[int] = field(
        default=None, metadata={"help": "Timed steps of the plain loop (default: as many samples as mmtrain)."}
    )
    profile: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "Profiler summary: auto = on a GPU when a target is missed."}
    )
    profile_steps: int = field(default=3, metadata={"help": "Steps the profiler records."})
    bf16_baseline: Literal["auto", "skip"] = field(
        default="auto",
        metadata={"help": "With --fp8_base on a GPU: also run mmtrain in bfloat16 on the same samples (a process of its own), "
                  "reported beside the float8 run in the same JSON."},
    )
    peak_tflops: Optional[float] = field(
        default=None, metadata={"help": "Dense bf16 peak (TFLOP/s) the MFU is taken against (default: the device's, from flops.PEAK_TFLOPS)."}
    )
    build_on_device: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "Materialise the random weights directly on the GPU (auto: on a GPU below ZeRO-3)."}
    )
    deepspeed_set: list[str] = field(
        default_factory=list,
        metadata={"help": "KEY=VALUE settings of the DeepSpeed config (dotted keys, e.g. "
                  "zero_optimization.stage3_prefetch_bucket_size=2.2e8), applied after the trainer has completed "
                  "the config and before the engine is made: what a user's DeepSpeed config file would set."},
    )
    num_processes: list[int] = field(
        default_factory=lambda: [1],
        metadata={"help": "mmtrain on each of these process counts, one GPU each (e.g. 1 2): each count in processes of its own, "
                  "started with torch.distributed.run; with more than one, scaling efficiency against the first."},
    )
    equal_segments_attention: Literal["cudnn", "sdpa"] = field(
        default="cudnn",
        metadata={"help": "Packed rows whose samples all have one length (under a variable-length kernel): cuDNN's dense "
                  "causal kernel, as training has it, or SDPA's own choice (to measure one against the other)."},
    )
    out: Optional[str] = field(default=None, metadata={"help": "JSON file to write."})

    def __post_init__(self):
        if len(self.text_tokens) != 2 or not 1 <= self.text_tokens[0] <= self.text_tokens[1]:
            raise ConfigError(f"--text_tokens needs MIN MAX with 1 <= MIN <= MAX, got {' '.join(map(str, self.text_tokens))}")
        if self.steps < 1 or self.warmup < 0 or self.epochs < 1:
            raise ConfigError("--steps and --epochs must be >= 1, --warmup >= 0")
        if self.offload != "none" and self.zero_stage in ("none", "0"):
            raise ConfigError("--offload needs --zero_stage 1-3")
        if self.offload == "optimizer+params" and self.zero_stage != "3":
            raise ConfigError("--offload optimizer+params needs --zero_stage 3")
        for item in self.deepspeed_set:
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"--deepspeed_set {item!r}: expected KEY=VALUE, e.g. zero_optimization.stage3_prefetch_bucket_size=2.2e8")
        if not self.num_processes or min(self.num_processes) < 1:
            raise ConfigError(f"--num_processes needs counts >= 1, got {' '.join(map(str, self.num_processes))}")


def _as_bench_takes_it(cls, group: str, shared_only: bool) -> type:
    """``cls``'s fields with the bench's defaults and short names; their types, help and checks stay the library's.

    ``shared_only``: just the fields of :data:`SHARED`, in a class of their own (to tell
    them apart from the flags passed on); otherwise a subclass of ``cls``.
    """
    hints = typing.get_type_hints(cls)
    short = {name: alias for alias, name in SHARED.items() if alias != name}
    wanted = set(SHARED.values()) if shared_only else set(BENCH_DEFAULTS) | set(short)  # a subclass inherits the rest
    specs = []
    for f in dataclasses.fields(cls):
        if f.name not in wanted:
            continue
        metadata = {**f.metadata, "aliases": [f"--{short[f.name]}"]} if f.name in short else dict(f.metadata)
        if f.name in BENCH_DEFAULTS:
            spec = field(default=BENCH_DEFAULTS[f.name], metadata=metadata)
        elif f.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=f.default_factory, metadata=metadata)
        else:
            spec = field(default=f.default, metadata=metadata)
        specs.append((f.name, hints[f.name], spec))
    bases = () if shared_only else (cls,)
    return dataclasses.make_dataclass(f"Bench{cls.__name__}", specs, bases=bases, namespace={"_argument_group_name": group})


def parse_options(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The bench's options (training flags it reads included, by its names) and the other training flags, as given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    full = FlagParser(
        (BenchArguments, *(_as_bench_takes_it(cls, group, False) for cls, group in LIBRARY)),
        prog=f"python {SCRIPT}", description=__doc__.splitlines()[0],
        epilog="Set by the bench: --output_dir (a temporary folder), --max_steps (warm-up + timed steps), "
        + ", ".join(f"--{k} {v}" for k, v in RUN_SETTINGS.items()) + ".",
    )
    _, model_args, _, _ = full.parse(argv)  # every flag checked as training checks it, before anything runs
    try:
        validate_paths(model_args)
    except ConfigError as e:
        full.error(str(e))
    own = FlagParser((BenchArguments, *(_as_bench_takes_it(cls, group, True) for cls, group in LIBRARY)))
    bench, *shared, rest = own.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
    values = {name: getattr(part, name) for part in shared for name in SHARED.values() if hasattr(part, name)}
    opts = argparse.Namespace(**{alias: values[name] for alias, name in SHARED.items()}, **asdict(bench))
    if token_budget(rest) and any(a.split("=", 1)[0] in ("--micro_batch", "--per_device_train_batch_size") for a in argv):
        full.error("--max_tokens_per_batch sizes mmtrain's micro-batches by tokens and would win over --micro_batch; drop --micro_batch")
    opts.zero_stage = None if opts.zero_stage == "none" else int(opts.zero_stage)
    opts.text_tokens = tuple(opts.text_tokens)
    return opts, rest


def token_budget(argv: list[str]) -> bool:
    """Whether ``--max_tokens_per_batch`` is among the flags (the micro-batch is then a budget, not samples)."""
    return any(a == "--max_tokens_per_batch" or a.startswith("--max_tokens_per_batch=") for a in argv)


def mmtrain_argv(opts, passthrough: list[str], output_dir: str) -> list[str]:
    """The command line of ``mmtrain.train`` for this run: the bench's settings, then the flags passed on."""
    values = {name: getattr(opts, alias) for alias, name in SHARED.items()}
    if token_budget(passthrough):
        del values["per_device_train_batch_size"]  # the budget sizes each micro-batch
    values.update(RUN_SETTINGS, max_steps=opts.warmup + opts.steps * opts.epochs, output_dir=output_dir)
    argv = []
    for name, value in values.items():
        argv += [f"--{name}", str(value)]
    return argv + passthrough


def training_arguments(opts, passthrough: list[str], output_dir: str):
    """(model, data, train) arguments exactly as the trainer parses them for this run."""
    from mmtrain.args import parse_args

    return parse_args(mmtrain_argv(opts, passthrough, output_dir))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def resolve_peak(opts, device: str) -> str:
    """Set ``opts.peak_tflops`` to the device's dense bf16 peak unless given; returns where the value came from."""
    if opts.peak_tflops is not None:
        return "--peak_tflops"
    found = dense_bf16_peak(device) if torch.cuda.is_available() else None
    if found is None:
        return f"none: {device!r} is not in flops.PEAK_TFLOPS (pass --peak_tflops for an MFU)"
    opts.peak_tflops = found[0]
    return f"flops.PEAK_TFLOPS[{found[1]!r}]"


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

    model_args, data_args, train_args = training_arguments(opts, passthrough, "unused")
    from mmtrain.training.distributed import prepare_environment

    prepare_environment()  # before DeepSpeed is imported (through the set-up below)
    from mmtrain.model.varlen_attention import use_cudnn_dense
    from mmtrain.training.speedups import should_compile

    use_cudnn_dense(opts.equal_segments_attention == "cudnn")

    compiled = should_compile(torch.device("cuda" if cuda else "cpu"), train_args)  # as the run will decide
    tokenizer, image_tokens, image_size = image_token_layout(model_args)
    longest = span_length(image_tokens) + opts.text_tokens[1]
    if longest > opts.seq_len:
        raise SystemExit(f"samples reach {longest} tokens (image span {span_length(image_tokens)} + text {opts.text_tokens[1]}) > --seq_len {opts.seq_len}")
    shape = lm_shape(opts.lm)
    device = device_name()
    peak_source = resolve_peak(opts, device)

    result = {
        "benchmark": SCRIPT,
        "workload": "ref-7b" if (opts.lm, opts.vision) == REF_7B and opts.projector == "mlp" and opts.lora_rank == 16 else "custom",
        "device": device,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "versions": versions(),
        "git": git_commit(),
        "command": " ".join(["python", SCRIPT, *raw]),
        "flags": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()}, "mmtrain_passthrough": passthrough},
        "lm": {**shape, "image_tokens_per_sample": span_length(image_tokens)},
        "flops_convention": CONVENTION,
        "peak_tflops": opts.peak_tflops,
        "peak_tflops_source": peak_source,
        "max_tokens_per_batch": data_args.max_tokens_per_batch,
        "fp8_base": train_args.fp8_base,
        # --packed_attention as given (auto: mmtrain.model.attention.packed_kernel decides)
        "packed_attention": train_args.packed_attention,
        "quantize_base": train_args.quantize_base,
        "targets": {"tokens_per_s": TARGET_TOKENS_PER_S, "ratio_over_plain": TARGET_RATIO},
    }
    timed_n = timed_samples(opts, data_args, span_length(image_tokens))

    plain = None
    worker = WORKER_ENV in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if os.environ.get("MMTRAIN_BENCH_STACKS"):  # diagnose a slow start or a hang: every process's stack every N s
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["MMTRAIN_BENCH_STACKS"]), repeat=True)
    if worker:  # one process of a launched group: mmtrain only, never a group of its own
        opts.plain = "skip"
        opts.num_processes = [int(os.environ.get("WORLD_SIZE", "1"))]
    if opts.plain == "only" or (opts.plain == "auto" and not cuda):
        plain = run_plain(opts, tokenizer, image_tokens, image_size, shape, timed_n, data_args.padding_multiple())
        result["plain"] = _public(plain)
        if opts.profile == "on" and "_profile_step" in plain:
            result["plain"]["profile"] = profile_or_error(*plain["_profile_step"], opts.profile_steps)
        plain.clear()  # the last references to the plain model: free it before mmtrain builds
        free_memory()
        if opts.plain == "only":
            return _write(result, opts.out, summary=f"plain loop: {result['plain'].get('tokens_per_s', 0):,.0f} tokens/s")
    elif opts.plain == "auto":
        plain = result["plain"] = plain_in_subprocesses(raw, opts.plain_batches)
    if train_args.fp8_base and cuda and not worker and opts.bf16_baseline == "auto" and opts.num_processes == [1]:
        result["mmtrain_bf16"] = bf16_in_subprocess(raw)

    if not worker and opts.num_processes != [1]:
        predictions = [
            memory_prediction(opts, model_args, n, compiled, fp8_base=train_args.fp8_base, max_tokens=data_args.max_tokens_per_batch)
            for n in opts.num_processes
        ]
        runs = [launched_mmtrain(raw, n) for n in opts.num_processes]
        for run, prediction in zip(runs, predictions):
            run["memory_prediction"] = prediction
        result["scaling"] = scaling_table(runs, predictions)
        result["mmtrain_by_processes"] = {str(r["num_processes"]): r for r in runs}
        mm = runs[0]
        result["mmtrain"] = mm
        if plain is not None and "tokens_per_s" in result["plain"]:
            result["ratio_tokens_per_s"] = mm["tokens_per_s"] / result["plain"]["tokens_per_s"]
        result["targets"]["missed"] = []
        return _write(result, opts.out, summary_line(result))

    # Before the run: the meta build it takes must not meet the run's DeepSpeed state (at
    # ZeRO-3, zero.Init would partition it, one process at a time). A launched group's
    # parent predicts for it.
    prediction = None
    if not worker:
        prediction = memory_prediction(opts, model_args, 1, compiled, fp8_base=train_args.fp8_base, max_tokens=data_args.max_tokens_per_batch,
                                       nf4_base=train_args.quantize_base == "nf4")
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-") as output_dir:
        mm = run_mmtrain(opts, *training_arguments(opts, passthrough, output_dir), tokenizer, image_tokens, image_size, shape)
        result["mmtrain"] = _public(mm)
        if prediction is not None:
            result["mmtrain"]["memory_prediction"] = prediction
        if worker:
            if opts.profile == "on":
                result["mmtrain"]["profile"] = profile_or_error(*mm["_profile_step"], opts.profile_steps)
            rank0 = int(os.environ.get("RANK", "0")) == 0
            written = _write(result, opts.out if rank0 else None, summary_line(result) if rank0 else "")
            # Every process leaves the group together: one left to tear its group down at
            # interpreter exit, after its peer had gone, sometimes aborted (SIGABRT) on CPU.
            accelerator = mm["_keep"][0]
            accelerator.wait_for_everyone()
            accelerator.end_training()
            return written
        if plain is not None and "tokens_per_s" in result["plain"]:
            result["ratio_tokens_per_s"] = mm["tokens_per_s"] / result["plain"]["tokens_per_s"]
        missed = []
        if result["workload"] == "ref-7b" and cuda:
            if mm["tokens_per_s"] < TARGET_TOKENS_PER_S:
                missed.append(f"tokens/s {mm['tokens_per_s']:.0f} < {TARGET_TOKENS_PER_S}")
            if result.get("ratio_tokens_per_s") is not None and result["ratio_tokens_per_s"] < TARGET_RATIO:
                missed.append(f"ratio {result['ratio_tokens_per_s']:.2f} < {TARGET_RATIO}")
        if train_args.fp8_base:
            missed = fp8_comparison(result, mm, opts, cuda)
        result["targets"]["missed"] = missed
        if opts.profile == "on" or (opts.profile == "auto" and missed):
            result["mmtrain"]["profile"] = profile_or_error(*mm["_profile_step"], opts.profile_steps)

    return _write(result, opts.out, summary_line(result))


def _write(result: dict, out: str | None, summary: str) -> dict:
    if int(os.environ.get("RANK", "0")) != 0:
        return result  # under torchrun every rank measures; the first one writes
    result["num_processes"] = int(os.environ.get("WORLD_SIZE", "1"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
    print(summary, flush=True)
    return result


WORKER_ENV = "MMTRAIN_BENCH_WORKER"  # set for the processes of one launched count


def _without(raw: list[str], names: tuple[str, ...]) -> list[str]:
    """``raw`` without the options ``names`` and their values (one or several)."""
    out, i = [], 0
    while i < len(raw):
        arg = raw[i]
        i += 1
        if arg.split("=", 1)[0] in names:
            while "=" not in arg and i < len(raw) and not raw[i].startswith("--"):
                i += 1
        else:
            out.append(arg)
    return out


def launched_mmtrain(raw: list[str], n: int) -> dict:
    """mmtrain's figures on ``n`` processes (one GPU each), from a group started by ``torch.distributed.run``."""
    base = _without(raw, ("--out", "--plain", "--plain_batches", "--num_processes"))
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-group-") as tmp:
        out = os.path.join(tmp, "group.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               os.path.join(HERE, "bench.py"), *base, "--plain", "skip", "--num_processes", str(n), "--out", out]
        print(f"mmtrain on {n} process(es): {' '.join(cmd[1:])}", flush=True)
        # The group's output goes straight through: a slow build or a hang shows where it is.
        proc = subprocess.run(cmd, env={**os.environ, WORKER_ENV: "1"})
        if proc.returncode != 0 or not os.path.exists(out):
            return {"num_processes": n, "error": f"exit {proc.returncode} (its output is above)"}
        with open(out) as f:
            return json.load(f)["mmtrain"]


def memory_prediction(opts, model_args, num_processes: int, compiled: bool = False, fp8_base: bool = False,
                      max_tokens: int | None = None, nf4_base: bool = False) -> dict:
    """``mmtrain.memory``'s peak for this run's setup on ``num_processes`` GPUs.

    Micro-batches of ``--micro_batch`` samples of the longest length; with a token budget
    (``max_tokens``), one packed row of the whole budget, the most a budget's micro-batch holds.
    """
    try:
        from mmtrain import memory

        facts = memory.model_facts(model_args)
        micro_batch, longest = memory.largest_micro_batch(opts.micro_batch, facts.image_tokens + 2 + opts.text_tokens[1], max_tokens)
        setup = memory.MemorySetup(
            zero_stage=opts.zero_stage or 0, offload=opts.offload, num_gpus=num_processes, micro_batch=micro_batch,
            seq_len=longest, precision=opts.precision, gradient_checkpointing=bool(opts.gradient_checkpointing),
            label_fraction=opts.label_fraction, compiled=compiled, fp8_base=fp8_base, nf4_base=nf4_base,
            **bucket_settings(opts.deepspeed_set),
        )
        est = memory.estimate(facts, setup)
        return {"setup": setup.name, "micro_batch": micro_batch, "seq_len": longest, "num_gpus": num_processes,
                "peak_bytes": est.total, "peak_gib": est.total / 2**30}
    except Exception as e:  # the figure is context; a failure must not lose the measurement
        return {"error": f"{type(e).__name__}: {e}"}


# The DeepSpeed settings mmtrain.memory takes, by MemorySetup field
_MEMORY_KEYS = {
    "zero_optimization.stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "zero_optimization.reduce_bucket_size": "reduce_bucket_size",
    "zero_optimization.stage3_max_live_parameters": "max_live_parameters",
    "zero_optimization.stage3_param_persistence_threshold": "param_persistence_threshold",
}


def bucket_settings(items: list[str]) -> dict:
    """The ``--deepspeed_set`` values the memory prediction takes, as MemorySetup fields."""
    return {_MEMORY_KEYS[k]: v for k, v in deepspeed_settings(items).items() if k in _MEMORY_KEYS}


def scaling_table(runs: list[dict], predictions: list[dict]) -> list[dict]:
    """Per count: total and per-GPU tokens/s, MFU per GPU, peak memory per GPU beside the prediction, efficiency."""
    first = runs[0].get("tokens_per_s_per_gpu")
    rows = []
    for run, pred in zip(runs, predictions):
        if "error" in run:
            rows.append({"num_processes": run["num_processes"], "error": run["error"]})
            continue
        peak = run.get("peak_allocated_bytes")
        rows.append({
            "num_processes": run["num_processes"],
            "tokens_per_s": run["tokens_per_s"],
            "tokens_per_s_per_gpu": run["tokens_per_s_per_gpu"],
            "mfu_per_gpu": run["mfu"],
            "scaling_efficiency": run["tokens_per_s_per_gpu"] / first if first else None,
            "peak_allocated_gib_per_rank": run.get("peak_allocated_gib_per_rank", [run.get("peak_allocated_gib")]),
            "predicted_peak_gib": pred.get("peak_gib"),
            "measured_over_predicted": peak / pred["peak_bytes"] if peak and pred.get("peak_bytes") else None,
            "loss_first": run.get("loss_first"),
            "loss_last": run.get("loss_last"),
        })
    return rows


def plain_in_subprocesses(raw: list[str], batches: list[int]) -> dict:
    """The plain loop's batch search on a GPU, one fresh process per micro-batch.

    Running out of memory near the limit does not always raise a clean
    ``OutOfMemoryError``: cuBLAS may fail with CUBLAS_STATUS_EXECUTION_FAILED and leave
    the CUDA context unusable, which would then fail mmtrain's own run in the same
    process. A child process per attempt keeps every failure contained.
    """
    base = _without(raw, ("--out", "--plain", "--plain_batches", "--num_processes"))
    failures = []
    for b in batches:
        with tempfile.TemporaryDirectory(prefix="mmtrain-bench-plain-") as tmp:
            out = os.path.join(tmp, "plain.json")
            cmd = [sys.executable, os.path.join(HERE, "bench.py"), *base, "--plain", "only", "--plain_batches", str(b), "--out", out]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            plain = json.load(open(out))["plain"] if proc.returncode == 0 and os.path.exists(out) else None
        if plain is not None and "tokens_per_s" in plain:
            plain["out_of_memory_at"] = [f["micro_batch"] for f in failures]
            plain["failed_attempts"] = failures
            return plain
        # A failure the child caught (running out of memory, mostly) is in its JSON; a crash only in its stderr.
        tail = [plain["error"]] if plain and plain.get("error") else (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        failures.append({"micro_batch": b, "returncode": proc.returncode, "error": str(tail[0])[:300]})
    return {"error": f"no micro-batch of {batches} ran", "failed_attempts": failures}


def bf16_in_subprocess(raw: list[str]) -> dict:
    """mmtrain with the same flags and samples but without the float8 base, in a fresh process (its memory freed)."""
    base = _without(raw, ("--out", "--plain", "--plain_batches", "--num_processes", "--fp8_base", "--fp8_vision", "--profile", "--bf16_baseline"))
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-bf16-") as tmp:
        out = os.path.join(tmp, "bf16.json")
        cmd = [sys.executable, os.path.join(HERE, "bench.py"), *base, "--plain", "skip", "--profile", "off", "--out", out]
        print(f"mmtrain in bfloat16: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"exit {proc.returncode} (its output is above)"}
        with open(out) as f:
            return json.load(f)["mmtrain"]


def fp8_comparison(result: dict, mm: dict, opts, cuda: bool) -> list[str]:
    """The float8 run's targets (ref-7b on one GPU) and its speed and memory over the bfloat16 run's; what was missed."""
    workload = "seq2048" if opts.text_tokens[0] == opts.text_tokens[1] else "mix"
    target = FP8_TARGET_TOKENS_PER_S[workload]
    result["targets"] = {"tokens_per_s": target, "fp8_workload": workload, "peak_below_bf16": True}
    missed = []
    bf16 = result.get("mmtrain_bf16") or {}
    if "tokens_per_s" in bf16:
        peaks = mm.get("peak_allocated_bytes") and bf16.get("peak_allocated_bytes")  # none on a CPU
        result["fp8_over_bf16"] = {
            "tokens_per_s": mm["tokens_per_s"] / bf16["tokens_per_s"],
            "peak_allocated": mm["peak_allocated_bytes"] / bf16["peak_allocated_bytes"] if peaks else None,
        }
        if peaks and mm["peak_allocated_bytes"] >= bf16["peak_allocated_bytes"]:
            missed.append(f"peak {mm['peak_allocated_gib']:.1f} GiB not below bf16's {bf16['peak_allocated_gib']:.1f}")
    if result["workload"] == "ref-7b" and cuda and mm["tokens_per_s"] < target:
        missed.append(f"tokens/s {mm['tokens_per_s']:.0f} < {target}")
    return missed


def summary_line(result: dict) -> str:
    mm = result["mmtrain"]
    if "error" in mm:
        return f"{result['device']}: mmtrain failed: {mm['error']}"
    parts = [f"{result['device']}: mmtrain {mm['tokens_per_s']:,.0f} tokens/s, {mm['samples_per_s']:.2f} samples/s, MFU {_percent(mm['mfu'])}"]
    if result.get("max_tokens_per_batch"):
        parts[0] += f" (budget {result['max_tokens_per_batch']} tokens, {mm['samples'] / max(mm['steps'], 1):.1f} samples per micro-batch)"
    if result.get("fp8_base"):
        parts[0] += " (float8 base)"
    if mm.get("num_processes", 1) > 1:
        parts[0] += f" ({mm['num_processes']} processes, {mm['tokens_per_s_per_gpu']:,.0f} per GPU)"
    for row in result.get("scaling", [])[1:]:
        if "error" in row:
            parts.append(f"{row['num_processes']} processes: {row['error']}")
        else:
            parts.append(f"{row['num_processes']} processes: {row['tokens_per_s']:,.0f} tokens/s, {row['tokens_per_s_per_gpu']:,.0f} per GPU, "
                         f"scaling {100 * row['scaling_efficiency']:.1f}%")
    if "peak_allocated_gib" in mm:
        parts.append(f"peak {mm['peak_allocated_gib']:.1f} GiB")
    bf16 = result.get("mmtrain_bf16")
    if bf16 and "tokens_per_s" in bf16:
        parts.append(f"bf16 {bf16['tokens_per_s']:,.0f} tokens/s, peak {bf16.get('peak_allocated_gib', 0):.1f} GiB "
                     f"(float8 {result['fp8_over_bf16']['tokens_per_s']:.2f}x)")
    elif bf16:
        parts.append(f"bf16: {bf16.get('error')}")
    plain = result.get("plain")
    if plain and "tokens_per_s" in plain:
        parts.append(f"plain (micro-batch {plain['micro_batch']}) {plain['tokens_per_s']:,.0f} tokens/s, MFU {_percent(plain['mfu'])}"
                     + (f", peak {plain['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in plain else ""))
        parts.append(f"ratio {result['ratio_tokens_per_s']:.2f}x")
    elif plain:
        parts.append(f"plain: {plain.get('error')}")
    if result["targets"].get("missed"):
        parts.append("missed: " + "; ".join(result["targets"]["missed"]))
    return " | ".join(parts)


def _percent(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


if __name__ == "__main__":
    main()
