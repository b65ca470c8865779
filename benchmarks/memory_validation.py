"""Measured peak GPU memory of real training steps beside ``mmtrain.memory.estimate``.

For each ref-7b setup of :func:`validation_rows` (ZeRO 0, 2, 2 + optimizer
offload, 3 + parameter and optimizer offload; micro-batch 1 and 4; with and without
gradient checkpointing; 2048-token samples of one image and 1470 text tokens, bf16) this
runs ``python benchmarks/bench.py`` in a fresh process (the DeepSpeed config is per process):
the trainer's own path, Accelerate + the DeepSpeed engine, for ``--steps`` optimizer steps
with no untimed warm-up, and reads ``torch.cuda.max_memory_allocated()`` over all of them,
the first step included. Each row is compared with the estimate (target: within 10%) and
written in the schema of :data:`MEASUREMENT_FIELDS`, plus the split that says
which term is off: *static* (allocated before the first step: weights, gradients'
partitions, optimizer states, buffers) and *transient* (peak minus static: activations,
logits, the vision pass, the optimizer step), measured and predicted.

    python benchmarks/memory_validation.py --out benchmarks/results/memory_h100.json   # all 16 rows, one GPU
    python benchmarks/memory_validation.py --rows 0-7 --out part1.json                  # a slice (10-minute limits)
    python benchmarks/memory_validation.py --combine part1.json part2.json --out benchmarks/results/memory_h100.json
    python benchmarks/memory_validation.py --list                                       # rows and predictions only
    python benchmarks/memory_validation.py --smoke --rows 0,8 --out /tmp/rows.json      # tiny presets, CPU dry run

Full fine-tuning of the LM (LLaVA-1.5's stage 2: ``--lm_training full``) on two GPUs at
ZeRO-3, each row one ``torchrun --nproc_per_node 2 benchmarks/bench.py`` (tokens/s of
both GPUs together, rank 0's peak memory)::

    python benchmarks/memory_validation.py --workload full-7b --out benchmarks/results/memory_full_7b_2gpu.json
    python benchmarks/memory_validation.py --workload full-7b --smoke --rows 0 --out /tmp/rows.json   # CPU dry run, two processes

Rows are written to ``--out`` after each setup, so a cut-off run keeps what it measured.
A setup that fails (out of memory, a crash) is listed in ``<out stem>_failed.json``.

The measurement file's schema, its reader (:func:`load_measurements`) and the comparison
with the predictions (:func:`compare`) live here too; notebook 02 plots the file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmtrain import memory  # noqa: E402
from mmtrain.args import ModelArguments  # noqa: E402

TOLERANCE = 0.10
SMOKE_MODEL = ("tiny-llama", "tiny-clip")
SMOKE_SEQ = 256


# --------------------------------------------------------------------------------------
# The measurement file: benchmarks/results/memory_h100.json
# --------------------------------------------------------------------------------------

MEASUREMENT_FIELDS = {
    "stage": int,  # ZeRO stage 0-3
    "offload": str,  # none | optimizer | optimizer+params
    "micro_batch": int,
    "seq_len": int,
    "gradient_checkpointing": bool,
    "num_gpus": int,
    "measured_peak_bytes": int,  # torch.cuda.max_memory_allocated over the measured steps
    "predicted_peak_bytes": int,  # estimate(...).total when measured
    "device": str,  # torch.cuda.get_device_name()
    "versions": dict,  # {"torch": ..., "transformers": ..., "deepspeed": ..., "mmtrain": ...}
    "command": str,  # the exact command that produced the row
}
"""The measurement file is a JSON list of objects with exactly these keys (extra keys are
allowed and kept, e.g. ``workload``, ``precision``, ``images_per_sample``, ``notes``)."""

MEASUREMENTS_PATH = "benchmarks/results/memory_h100.json"
WORKLOADS = ("ref-7b", "full-7b")


def validation_rows() -> list[memory.MemorySetup]:
    """The ref-7b setups to measure on one H100, in this order (16 runs, 2048 tokens, bf16)."""
    rows = []
    for stage, offload in ((0, "none"), (2, "none"), (2, "optimizer"), (3, "optimizer+params")):
        for micro_batch in (1, 4):
            for ckpt in (False, True):
                rows.append(
                    memory.MemorySetup(
                        zero_stage=stage,
                        offload=offload,
                        num_gpus=1,
                        micro_batch=micro_batch,
                        seq_len=2048,
                        precision="bf16",
                        gradient_checkpointing=ckpt,
                    )
                )
    return rows


def full_finetune_rows() -> list[memory.MemorySetup]:
    """7B with every LM weight trained, on two GPUs at ZeRO-3 (with and without optimizer offload), 2048 tokens, bf16."""
    rows = []
    for offload, micro_batch in (("none", 4), ("none", 8), ("optimizer", 4)):
        rows.append(
            memory.MemorySetup(
                zero_stage=3, offload=offload, num_gpus=2, micro_batch=micro_batch, seq_len=2048, precision="bf16", gradient_checkpointing=True
            )
        )
    return rows


def setup_from_row(row: dict) -> memory.MemorySetup:
    """The :class:`~mmtrain.memory.MemorySetup` a measurement row describes."""
    extra = {k: row[k] for k in ("precision", "images_per_sample", "label_fraction") if k in row}
    return memory.MemorySetup(
        zero_stage=row["stage"],
        offload=row["offload"],
        num_gpus=row["num_gpus"],
        micro_batch=row["micro_batch"],
        seq_len=row["seq_len"],
        gradient_checkpointing=row["gradient_checkpointing"],
        **extra,
    )


def load_measurements(path: str = MEASUREMENTS_PATH) -> list[dict]:
    """Read and check a measurement file (schema: :data:`MEASUREMENT_FIELDS`)."""
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    for k, row in enumerate(rows):
        missing = [key for key in MEASUREMENT_FIELDS if key not in row]
        if missing:
            raise ValueError(f"{path}: row {k} lacks {', '.join(missing)}")
        for key, kind in MEASUREMENT_FIELDS.items():
            ok = isinstance(row[key], kind) and not (kind is int and isinstance(row[key], bool))
            if not ok:
                raise ValueError(f"{path}: row {k} field {key!r} should be {kind.__name__}, got {row[key]!r}")
        if row["offload"] not in memory.OFFLOADS:
            raise ValueError(f"{path}: row {k} offload {row['offload']!r} is not one of {', '.join(memory.OFFLOADS)}")
    return rows


def compare(rows: list[dict], tolerance: float = TOLERANCE) -> list[dict]:
    """Each row with ``ratio`` = measured / predicted and ``within`` = |ratio - 1| <= tolerance."""
    out = []
    for row in rows:
        ratio = row["measured_peak_bytes"] / max(row["predicted_peak_bytes"], 1)
        out.append({**row, "ratio": ratio, "within": abs(ratio - 1) <= tolerance})
    return out


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def parse_rows(spec: str, n: int) -> list[int]:
    """``all``, ``3``, ``0-7`` or ``0,2,9-11`` -> indices into the validation rows."""
    if spec == "all":
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        else:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise SystemExit(f"--rows {spec}: rows {bad} outside 0-{n - 1}")
    return out


def model_args(smoke: bool, workload: str = "ref-7b") -> ModelArguments:
    full = dict(lang_lora_dim=0, lm_training="full") if workload == "full-7b" else dict(lang_lora_dim=16)
    if smoke:
        lm, vision = SMOKE_MODEL
        return ModelArguments(lm_model_name_or_path=lm, vision_model_name_or_path=vision, vis_proj="mlp", **full)
    if workload == "full-7b":
        return replace(memory.ref_model_args("ref-7b"), **full)
    return memory.ref_model_args("ref-7b")


def setups(smoke: bool, workload: str = "ref-7b") -> list[memory.MemorySetup]:
    rows = full_finetune_rows() if workload == "full-7b" else validation_rows()
    if smoke:
        rows = [replace(r, seq_len=SMOKE_SEQ) for r in rows]
    return rows


def bench_command(args: ModelArguments, setup: memory.MemorySetup, text: int, steps: int) -> list[str]:
    cmd = [
        "python", "benchmarks/bench.py",
        "--lm_model_name_or_path", args.lm_model_name_or_path,
        "--vision_model_name_or_path", args.vision_model_name_or_path,
        "--vis_proj", args.vis_proj,
        "--lang_lora_dim", str(args.lang_lora_dim),
        "--lang_lora_module_name", args.lang_lora_module_name,
        "--lm_training", args.lm_training,
        "--zero_stage", str(setup.zero_stage),
        "--offload", setup.offload,
        "--per_device_train_batch_size", str(setup.micro_batch),
        "--max_seq_len", str(setup.seq_len),
        "--text_tokens", str(text), str(text),
        "--label_fraction", str(setup.label_fraction),
        "--precision", setup.precision,
        "--steps", str(steps),
        "--warmup", "0",
        "--plain", "skip",
        "--profile", "off",
    ]
    if setup.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    if setup.num_gpus > 1:
        # one process per GPU; the bench keeps torchrun's ranks and the first writes the result
        cmd[:2] = ["torchrun", "--standalone", "--nproc_per_node", str(setup.num_gpus), "benchmarks/bench.py"]
    return cmd


def measure(index: int, args: ModelArguments, setup: memory.MemorySetup, facts, steps: int, timeout: int) -> dict:
    text = setup.seq_len - setup.images_per_sample * (facts.image_tokens + 2)
    est = memory.estimate(facts, setup)
    with tempfile.TemporaryDirectory(prefix="mmtrain-memrow-") as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = bench_command(args, setup, text, steps)
        shown = " ".join(shlex.quote(c) for c in cmd)
        print(f"[row {index}] {setup.name} micro-batch {setup.micro_batch}: {shown}", flush=True)
        start = time.perf_counter()
        try:
            launcher = [sys.executable, "-m", "torch.distributed.run"] if cmd[0] == "torchrun" else [sys.executable]
            proc = subprocess.run([*launcher, *cmd[1:], "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"index": index, "name": setup.name, "micro_batch": setup.micro_batch, "error": f"timed out after {timeout} s", "command": shown}
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = (proc.stdout + proc.stderr)[-3000:]
            oom = "OutOfMemoryError" in tail or "CUDA out of memory" in tail
            return {"index": index, "name": setup.name, "micro_batch": setup.micro_batch, "error": "out of memory" if oom else f"exit {proc.returncode}",
                    "output_tail": tail, "command": shown, "predicted_peak_bytes": est.total}
        with open(out) as f:
            bench = json.load(f)
    mm = bench["mmtrain"]
    measured = int(mm.get("peak_allocated_bytes", 0))
    static = mm.get("static_allocated_bytes")
    row = {
        "stage": setup.zero_stage,
        "offload": setup.offload,
        "micro_batch": setup.micro_batch,
        "seq_len": setup.seq_len,
        "gradient_checkpointing": setup.gradient_checkpointing,
        "num_gpus": setup.num_gpus,
        "measured_peak_bytes": measured,
        "predicted_peak_bytes": int(est.total),
        "device": bench["device"],
        "versions": {**{k: bench["versions"].get(k) for k in ("torch", "transformers", "deepspeed", "accelerate", "peft", "cuda")},
                     "mmtrain": bench["git"]["commit"]},
        "command": shown,
        # extras
        "workload": ("smoke-" if args.lm_model_name_or_path == SMOKE_MODEL[0] else "") + ("full-7b" if args.lm_training == "full" else "ref-7b"),
        "name": setup.name,
        "precision": setup.precision,
        "images_per_sample": setup.images_per_sample,
        "label_fraction": setup.label_fraction,
        "text_tokens_per_sample": text,
        "steps_measured": mm["steps"],
        "ratio": measured / est.total if measured else None,
        "within_10pct": abs(measured / est.total - 1) <= TOLERANCE if measured else None,
        "measured_static_bytes": static,
        "predicted_static_bytes": est.static,
        "measured_transient_bytes": measured - static if static is not None and measured else None,
        "predicted_transient_bytes": est.total - est.static,
        "measured_peak_reserved_bytes": mm.get("peak_reserved_bytes"),
        "predicted": {k: v for k, v in est.as_dict().items() if k not in ("setup",)},
        "step_s_median": mm["step_s_median"],
        "tokens_per_s": mm.get("tokens_per_s"),  # every process's tokens together
        "wall_s": seconds,
        "git_dirty": bench["git"].get("dirty"),
    }
    if not measured:
        row["notes"] = "no CUDA device: nothing measured (dry run)"
    return row


def summarise(rows: list[dict]) -> str:
    gib = 2**30
    lines = [f"{'setup':<24}{'mb':>3}{'predicted':>11}{'measured':>10}{'ratio':>7}  {'static p/m':>13}  {'transient p/m':>15}  within"]
    for r in rows:
        ratio = r["measured_peak_bytes"] / max(r["predicted_peak_bytes"], 1)
        ms, mt = r.get("measured_static_bytes"), r.get("measured_transient_bytes")
        static = f"{r['predicted_static_bytes'] / gib:.1f}/{ms / gib:.1f}" if ms is not None else "-"
        transient = f"{r['predicted_transient_bytes'] / gib:.1f}/{mt / gib:.1f}" if mt is not None else "-"
        name = r.get("name") or setup_from_row(r).name
        lines.append(
            f"{name:<24}{r['micro_batch']:>3}{r['predicted_peak_bytes'] / gib:>11.2f}{r['measured_peak_bytes'] / gib:>10.2f}"
            f"{ratio:>7.3f}  {static:>13}  {transient:>15}  {'yes' if abs(ratio - 1) <= TOLERANCE else 'NO'}"
        )
    return "\n".join(lines)


def write(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def combine(paths: list[str], out: str) -> list[dict]:
    """Merge row files (later files win for the same setup), ordered as ``validation_rows()``."""
    order = {(s.zero_stage, s.offload, s.micro_batch, s.gradient_checkpointing): i for i, s in enumerate(validation_rows())}
    merged: dict[tuple, dict] = {}
    for path in paths:
        for row in load_measurements(path):
            merged[(row["stage"], row["offload"], row["micro_batch"], row["gradient_checkpointing"])] = row
    rows = sorted(merged.values(), key=lambda r: order.get((r["stage"], r["offload"], r["micro_batch"], r["gradient_checkpointing"]), 99))
    write(out, rows)
    load_measurements(out)  # the file the project reads must pass its own check
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="all", help="which validation rows: all, 3, 0-7, 0,2,9-11")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "memory_h100.json"))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps measured per setup (the first included)")
    p.add_argument("--timeout", type=int, default=420, help="seconds allowed per setup")
    p.add_argument("--list", action="store_true", help="print the rows and their predictions, measure nothing")
    p.add_argument("--smoke", action="store_true", help=f"tiny presets at {SMOKE_SEQ} tokens (a CPU dry run of this script)")
    p.add_argument("--combine", nargs="+", metavar="FILE", help="merge measured row files into --out and print the comparison")
    p.add_argument("--workload", choices=WORKLOADS, default="ref-7b",
                   help="ref-7b: LoRA rows on one GPU; full-7b: the whole LM trained, ZeRO-3 on two GPUs (torchrun)")
    opts = p.parse_args(argv)

    if opts.combine:
        rows = combine(opts.combine, opts.out)
        print(summarise(rows))
        within = sum(abs(r["measured_peak_bytes"] / r["predicted_peak_bytes"] - 1) <= TOLERANCE for r in rows)
        print(f"{within}/{len(rows)} rows within {TOLERANCE:.0%} -> {opts.out}")
        return 0

    args = model_args(opts.smoke, opts.workload)
    facts = memory.model_facts(args)
    all_setups = setups(opts.smoke, opts.workload)
    chosen = parse_rows(opts.rows, len(all_setups))
    if opts.list:
        for i in chosen:
            s = all_setups[i]
            e = memory.estimate(facts, s)
            print(f"{i:>2} {s.name:<24} micro-batch {s.micro_batch}: predicted {e.total / 2**30:.2f} GiB (static {e.static / 2**30:.2f})")
        return 0

    rows, failed = [], []
    stem = os.path.splitext(opts.out)[0]
    for i in chosen:
        result = measure(i, args, all_setups[i], facts, opts.steps, opts.timeout)
        if "error" in result:
            print(f"[row {i}] FAILED: {result['error']}\n{result.get('output_tail', '')[-1500:]}", flush=True)
            failed.append(result)
            write(stem + "_failed.json", failed)
            continue
        rows.append(result)
        write(opts.out, rows)
        gib = 2**30
        print(f"[row {i}] predicted {result['predicted_peak_bytes'] / gib:.2f} GiB, measured {result['measured_peak_bytes'] / gib:.2f} GiB"
              + (f", ratio {result['ratio']:.3f}" if result["ratio"] else "") + f" ({result['wall_s']:.0f} s)", flush=True)
    if rows:
        load_measurements(opts.out)
        print(summarise(rows))
    print(f"{len(rows)} measured, {len(failed)} failed -> {opts.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
