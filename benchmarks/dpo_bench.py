"""DPO speed on one GPU: mmtrain's ``--objective dpo`` beside TRL's ``DPOTrainer`` on the same model, LoRA and pairs.

    python benchmarks/dpo_bench.py --out benchmarks/results/dpo_bench_h200.json   # ref-7b, one GPU
    python benchmarks/dpo_bench.py --smoke --out /tmp/dpo.json                     # tiny presets, CPU (or SMOKE=1)

**The workload** (ref-7b by default): the ``llama-2-7b`` and ``clip-vit-large-patch14-336``
presets with random weights, MLP projector, LoRA of the LLaVA recipes (rank 128, alpha
256, every Linear of the LM's decoder layers), bf16. Each pair (``dpo_pairs.py``) is one
image and a prompt with two answers of ``--answer_tokens`` each, every half
``--tokens_per_half`` tokens long (576 image tokens and their two markers included), so
no batch is padded; the pairs are the same ids and pixels for both systems (TRL's
collated rows are checked against mmtrain's).

**mmtrain** (``mmtrain_dpo.py``) runs the trainer's own DPO step, single process: the Accelerator of
``distributed.make_accelerator`` with Accelerate's DeepSpeed plugin (ZeRO-2, as the
LLaVA DPO recipe; ``--zero_stage``), ``setup.build_for_training``, the pairs through
``PairCollator`` (chosen rows, then rejected rows, each image once), ``EngineView``,
``PreferenceObjective`` with ``ReferencePolicy`` (the adapters switched off, the
projector and image-token rows swapped for their starting copies), and
``Loop.train_step``. Gradient checkpointing and the rest follow mmtrain's defaults;
training flags after the bench's own are passed on (``--gradient_checkpointing true``).

**TRL** (``trl_dpo.py``): ``DPOTrainer`` on ``LlavaForConditionalGeneration`` holding the
same weights, peft LoRA of the same rank, alpha and Linears (projector and image-token
rows trained too), reference = adapters off (``ref_model=None``), gradient checkpointing,
bf16, ``max_length=None`` (nothing truncated), ``precompute_ref_log_probs=False``.

**The batch search**: each system from its first guess (``--mmtrain_batch``,
``--trl_batch``), one fresh process per try (a 7B model built once in each): doubled
while it fits, up to ``--max_batch`` (mmtrain's up to ``--mmtrain_max_batch``), stopping at the first that runs out of memory;
halved from a guess that does not fit until one does. The largest that fits is
reported, with the batches that ran out of memory.

**Figures**: ``--warmup`` untimed steps, then ``--steps`` timed ones with the device
synchronised around them (data loading inside, as in training). pairs/s and tokens/s
(both halves, image tokens included); peak memory is ``torch.cuda.max_memory_allocated()``
from just before the first step to the end. The ratio is mmtrain's pairs/s over TRL's,
and its peak over TRL's; the issue's target is >= 2x at <= TRL's memory.

Writes one JSON (``--out``): device, versions (trl included), git commit, command, flags,
the pairs, both systems' rows and the ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):  # benchmarks/ is not a package: its modules, and this checkout's mmtrain
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from bench import _without  # noqa: E402  (one parser of option lists for the benches)

from mmtrain.args import ConfigError  # noqa: E402
from mmtrain.cli import FlagParser  # noqa: E402

SCRIPT = "benchmarks/dpo_bench.py"
REF_7B = ("llama-2-7b", "clip-vit-large-patch14-336")
TARGET_PAIRS_RATIO = 2.0  # mmtrain's pairs/s over TRL's, at no more peak memory (issue: preference tuning, item 7)
# --smoke: the tiny presets on CPU, both systems two timed steps at one batch (no search)
SMOKE = {"lm": "tiny-llama", "vision": "tiny-clip", "tokens_per_half": 160, "answer_tokens": 32, "warmup": 1, "steps": 2,
         "mmtrain_batch": 2, "trl_batch": 2, "max_batch": 2, "num_workers": 0}


@dataclass
class DPOBenchArguments:
    lm: str = field(default=REF_7B[0], metadata={"help": "Language model (a preset or a folder)."})
    vision: str = field(default=REF_7B[1], metadata={"help": "Vision encoder (a preset or a folder)."})
    smoke: bool = field(default=False, metadata={"help": "The tiny presets on CPU, 2 timed steps at batch 2, no search (also SMOKE=1)."})
    tokens_per_half: int = field(default=2048, metadata={"help": "Tokens of each half of a pair (chosen or rejected), image tokens included."})
    answer_tokens: int = field(default=256, metadata={"help": "Tokens of each answer (chosen and rejected alike)."})
    lora_rank: int = field(default=128, metadata={"help": "LoRA rank on the LM (the LLaVA recipes': 128)."})
    lora_alpha: float = field(default=256.0, metadata={"help": "LoRA alpha on the LM (the LLaVA recipes': 256)."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta (sigmoid loss) of both systems."})
    warmup: int = field(default=3, metadata={"help": "Untimed steps first."})
    steps: int = field(default=5, metadata={"help": "Timed steps."})
    mmtrain_batch: int = field(default=4, metadata={"help": "mmtrain's first micro-batch (pairs) of the search (4: about 105 GiB on ref-7b by mmtrain.memory)."})
    trl_batch: int = field(default=16, metadata={"help": "TRL's first per-device batch (pairs) of the search (checkpointed: far less memory per pair)."})
    max_batch: int = field(default=64, metadata={"help": "The search goes no higher."})
    mmtrain_max_batch: Optional[int] = field(
        default=None, metadata={"help": "mmtrain's search goes no higher (default --max_batch): to hold its memory at or under TRL's."}
    )
    systems: list[str] = field(default_factory=lambda: ["mmtrain", "trl"], metadata={"help": "Which systems run: mmtrain, trl."})
    zero_stage: Literal["none", "0", "1", "2"] = field(
        default="2", metadata={"help": "mmtrain's DeepSpeed ZeRO stage (none: Accelerate without DeepSpeed); DPO refuses ZeRO-3."}
    )
    num_workers: int = field(default=4, metadata={"help": "Data loader workers of both systems."})
    seed: int = field(default=0, metadata={"help": "Seed of the pairs and the training runs."})
    worker: Optional[Literal["mmtrain", "trl"]] = field(default=None, metadata={"help": "(internal) run one system at --batch in this process."})
    batch: Optional[int] = field(default=None, metadata={"help": "(internal) the batch of a --worker run."})
    out: Optional[str] = field(default=None, metadata={"help": "JSON file to write."})
    compare: Optional[str] = field(
        default=None, metadata={"help": "Only recompute the ratios and the target of this bench JSON from its measured rows (rewritten in place)."}
    )

    def __post_init__(self):
        if self.smoke or os.environ.get("SMOKE") == "1":
            self.smoke = True
            for key, value in SMOKE.items():
                setattr(self, key, value)
        for name in ("tokens_per_half", "answer_tokens", "lora_rank", "steps", "mmtrain_batch", "trl_batch", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1")
        if self.warmup < 1:
            raise ConfigError("--warmup must be >= 1 (the first step's time is never timed)")
        unknown = set(self.systems) - {"mmtrain", "trl"}
        if unknown or not self.systems:
            raise ConfigError(f"--systems takes mmtrain and/or trl, got {' '.join(self.systems)}")
        if self.worker and not self.batch:
            raise ConfigError("--worker needs --batch")


def parse_options(argv: list[str]) -> tuple[DPOBenchArguments, list[str]]:
    """The bench's options and the mmtrain training flags passed on (checked as training checks them)."""
    parser = FlagParser((DPOBenchArguments,), prog=f"python {SCRIPT}", description=__doc__.splitlines()[0])
    opts, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True, look_for_args_file=False)
    mmtrain_flags(opts, rest, batch=1, output_dir="unused", lora=True)  # a bad flag stops here, before any weights
    return opts, rest


def mmtrain_flags(opts, passthrough: list[str], *, batch: int, output_dir: str, lora: bool):
    """(model, data, train) arguments of mmtrain's DPO run at ``batch`` pairs (``lora=False``: the same model without LoRA)."""
    from bench import RUN_SETTINGS

    from mmtrain.args import parse_args

    values = {
        "lm_model_name_or_path": opts.lm, "vision_model_name_or_path": opts.vision, "vis_proj": "mlp",
        "lang_lora_dim": opts.lora_rank if lora else 0, "lang_lora_alpha": opts.lora_alpha, "lang_lora_module_name": "model.layers.",
        "objective": "dpo", "dpo_beta": opts.beta, "dpo_loss": "sigmoid", "per_device_train_batch_size": batch,
        "max_seq_len": opts.tokens_per_half, "seed": opts.seed, "num_workers": opts.num_workers, "learning_rate": 5e-6,
        **RUN_SETTINGS, "max_steps": opts.warmup + opts.steps, "output_dir": output_dir,
    }
    argv = [item for name, value in values.items() for item in (f"--{name}", str(value))]
    return parse_args(argv + passthrough)


# --------------------------------------------------------------------------------------
# One system at one batch (a worker process)
# --------------------------------------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """An out-of-memory error, or cuBLAS failing for want of workspace near the limit (it says so otherwise)."""
    return isinstance(err, torch.OutOfMemoryError) or ("CUBLAS_STATUS" in str(err) and "ALLOC" in str(err)) or "CUBLAS_STATUS_EXECUTION_FAILED" in str(err)


def worker(opts, passthrough: list[str]) -> dict:
    """One system at ``--batch``: its figures, or ``{"out_of_memory": True}``, or its error; written to ``--out``."""
    with tempfile.TemporaryDirectory(prefix=f"dpo-bench-{opts.worker}-") as tmp:
        model_args, data_args, train_args = mmtrain_flags(opts, passthrough, batch=opts.batch, output_dir=tmp, lora=opts.worker == "mmtrain")
        try:
            if opts.worker == "mmtrain":
                from mmtrain_dpo import run_mmtrain

                result = run_mmtrain(opts, model_args, data_args, train_args, opts.batch)
            else:
                from trl_dpo import run_trl

                result = run_trl(opts, model_args, opts.batch, tmp)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            result = {"batch": opts.batch, "out_of_memory": True, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    _write(result, opts.out)
    return result


# --------------------------------------------------------------------------------------
# The search and the result
# --------------------------------------------------------------------------------------


def attempt(raw: list[str], system: str, batch: int) -> dict:
    """``system`` at ``batch`` pairs in a fresh process: its result, or what stopped it (an out-of-memory error as ``out_of_memory``)."""
    base = _without(raw, ("--out", "--worker", "--batch"))
    with tempfile.TemporaryDirectory(prefix="dpo-bench-try-") as tmp:
        out = os.path.join(tmp, "try.json")
        cmd = [sys.executable, os.path.join(HERE, "dpo_bench.py"), *base, "--worker", system, "--batch", str(batch), "--out", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        result = json.load(open(out)) if proc.returncode == 0 and os.path.exists(out) else None
    if result is None:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-12:]
        # A process killed for memory, or a CUDA error after an allocation failed, is out of memory too.
        oom = any("out of memory" in line.lower() for line in tail) or proc.returncode in (-9, 137)
        result = {"batch": batch, "returncode": proc.returncode, "error": " | ".join(tail)[-1500:], "out_of_memory": oom}
    result["process_wall_s"] = wall
    what = "out of memory" if result.get("out_of_memory") else result.get("error", "")[:300] or f"{result['pairs_per_s']:.3f} pairs/s"
    print(f"[dpo-bench] {system} batch {batch}: {what} ({wall:.0f} s)", flush=True)
    return result


def search(raw: list[str], system: str, first: int, most: int) -> dict:
    """The largest batch of ``system`` that fits: doubled from ``first`` while it fits, halved while it does not."""
    tries, best, batch, down = [], None, first, False
    while True:
        result = attempt(raw, system, batch)
        tries.append(result)
        if "pairs_per_s" in result:
            best = result
            if down or batch * 2 > most:
                break
            batch *= 2
        elif result.get("out_of_memory") and best is None and batch > 1:
            batch, down = batch // 2, True
        else:
            break  # the first out-of-memory above a fit, or an error that is not about memory
    row = dict(best) if best else {"error": tries[-1].get("error", "no batch ran")}
    row["out_of_memory_at"] = [t["batch"] for t in tries if t.get("out_of_memory")]
    row["tries"] = [{k: t.get(k) for k in ("batch", "pairs_per_s", "peak_allocated_gib", "out_of_memory", "error", "process_wall_s")} for t in tries]
    return row


def versions() -> dict:
    from bench import versions as base_versions

    out = base_versions()
    for name in ("trl", "datasets"):
        try:
            with contextlib.redirect_stdout(sys.stderr):
                out[name] = __import__(name).__version__
        except Exception as e:  # recorded: TRL's side then reports why it could not run
            out[name] = f"unavailable: {type(e).__name__}: {e}"
    return out


def compare(result: dict) -> None:
    """The ratios of mmtrain over TRL and whether the issue's target was met (None where a side has no figures)."""
    mm, trl = result.get("mmtrain", {}), result.get("trl", {})
    if "pairs_per_s" not in mm or "pairs_per_s" not in trl:
        result["ratio"] = None
        result["target_met"] = None
        return
    peaks = mm.get("peak_allocated_bytes") and trl.get("peak_allocated_bytes")
    result["ratio"] = {
        "pairs_per_s": mm["pairs_per_s"] / trl["pairs_per_s"],
        "tokens_per_s": mm["tokens_per_s"] / trl["tokens_per_s"],
        "peak_allocated": mm["peak_allocated_bytes"] / trl["peak_allocated_bytes"] if peaks else None,
    }
    # The target is a speed at no more memory: mmtrain's fastest batch whose peak is at most TRL's.
    within = [
        t for t in mm.get("tries") or [mm]
        if t.get("pairs_per_s") and t.get("peak_allocated_gib") is not None and t["peak_allocated_gib"] <= trl.get("peak_allocated_gib", 0)
    ]
    best = max(within, key=lambda t: t["pairs_per_s"], default=None)
    result["at_trl_memory"] = None if best is None else {
        "batch": best["batch"], "pairs_per_s": best["pairs_per_s"], "peak_allocated_gib": best["peak_allocated_gib"],
        "pairs_per_s_over_trl": best["pairs_per_s"] / trl["pairs_per_s"], "peak_over_trl": best["peak_allocated_gib"] / trl["peak_allocated_gib"],
    }
    if peaks:
        result["target_met"] = best is not None and result["at_trl_memory"]["pairs_per_s_over_trl"] >= TARGET_PAIRS_RATIO
    else:
        result["target_met"] = None


def summary_line(result: dict) -> str:
    parts = [result["device"]]
    for system in ("mmtrain", "trl"):
        row = result.get(system)
        if row is None:
            continue
        if "pairs_per_s" in row:
            peak = f", peak {row['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in row else ""
            oom = f", out of memory at {row['out_of_memory_at']}" if row["out_of_memory_at"] else ""
            parts.append(f"{system} batch {row['batch']}: {row['pairs_per_s']:.3f} pairs/s, {row['tokens_per_s']:,.0f} tokens/s{peak}{oom}")
        else:
            parts.append(f"{system}: {row.get('error', '')[:300]}")
    if result.get("ratio"):
        r = result["ratio"]
        mem = f", memory {r['peak_allocated']:.2f}x" if r["peak_allocated"] else ""
        parts.append(f"mmtrain/TRL {r['pairs_per_s']:.2f}x pairs/s{mem}")
        at = result.get("at_trl_memory")
        if at:
            parts.append(f"at <= TRL's memory: mmtrain batch {at['batch']} {at['pairs_per_s_over_trl']:.2f}x pairs/s, memory {at['peak_over_trl']:.2f}x")
        parts.append(f"target >= {TARGET_PAIRS_RATIO}x at <= 1x memory: {result['target_met']}")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = list(sys.argv[1:] if argv is None else argv)
    opts, passthrough = parse_options(raw)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if opts.worker:
        return worker(opts, passthrough)
    if opts.compare:
        with open(opts.compare) as f:
            result = json.load(f)
        compare(result)
        print(summary_line(result))
        return _write(result, opts.compare)

    from bench import device_name
    from provenance import git_commit

    result = {
        "benchmark": SCRIPT,
        "workload": "smoke" if opts.smoke else ("ref-7b" if (opts.lm, opts.vision) == REF_7B else "custom"),
        "device": None,  # read after the tries: naming the GPU opens a CUDA context here, which would hold memory beside theirs
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "versions": None,  # after the tries too: importing DeepSpeed may touch the GPU
        "git": git_commit(),
        "command": " ".join(["python", SCRIPT, *raw]),
        "flags": {**asdict(opts), "mmtrain_passthrough": passthrough},
        "pairs": {"tokens_per_half": opts.tokens_per_half, "answer_tokens": opts.answer_tokens,
                  "tokens_per_pair": 2 * opts.tokens_per_half, "seed": opts.seed},
        "target": {"pairs_per_s_over_trl": TARGET_PAIRS_RATIO, "peak_memory_over_trl": 1.0},
    }
    for system in ("mmtrain", "trl"):
        if system in opts.systems:
            first = opts.mmtrain_batch if system == "mmtrain" else opts.trl_batch
            most = opts.mmtrain_max_batch if system == "mmtrain" and opts.mmtrain_max_batch else opts.max_batch
            result[system] = search(raw, system, first, most)
            _write(result, opts.out)  # what is measured so far survives a command cut off by its time limit
    result["device"], result["versions"] = device_name(), versions()
    compare(result)
    return _write(result, opts.out, summary_line(result))


def _write(result: dict, out: str | None, summary: str = "") -> dict:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
            f.write("\n")
    if summary:
        print(summary, flush=True)
    return result


if __name__ == "__main__":
    main()
