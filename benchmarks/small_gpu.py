"""ref-7b on the GPUs people have: one large GPU capped at 12, 16, 24 and 48 GiB, each cap trained with mmtrain.memory's recommendation.

    python benchmarks/small_gpu.py --out benchmarks/results/small_gpu_h200.json     # one H200 (or H100), ~8 min
    SMOKE=1 python benchmarks/small_gpu.py --out /tmp/small_gpu_smoke.json         # tiny presets on the CPU, no caps

For each cap, ``mmtrain.memory``'s options table (:mod:`mmtrain.memory.options`) for ref-7b
at that memory names the fastest setting that fits (bfloat16, or a 4-bit base, with or
without checkpointing, offload, and a token budget; float8 only with ``--float8_gpu``: most
small cards have no float8 tensor cores). A process of its own then caps the GPU with
``torch.cuda.set_per_process_memory_fraction(cap / total)`` before anything is
allocated, and trains that setting through ``benchmarks/bench.py`` (mmtrain's own
training step, the ref-7b workload of ``benchmarks/workload.py``, synthetic samples of
one image and 64-1024 text tokens), ``--warmup`` untimed and ``--steps`` timed steps.

A cap is an upper bound the caching allocator enforces: an allocation past it raises
out-of-memory, so a run that finishes never held more than the cap, loading included.
Each row also records the training peak (``torch.cuda.max_memory_allocated`` and
``max_memory_reserved`` from the first step on) beside the cap and beside the
recommendation's predicted peak (``prediction_error`` = measured / predicted - 1), and the
measured tokens/s beside the predicted one. This is one large GPU with a memory cap, not
the smaller card: the figures say what fits, and the speeds are the large GPU's.

The JSON holds the device, versions, code commit, command and one row per cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from provenance import git_commit  # noqa: E402

SCRIPT = "benchmarks/small_gpu.py"
CAPS_GIB = (12, 16, 24, 48)
GiB = 2**30


def recommendation(cap_gib: float, *, smoke: bool, float8_gpu: bool) -> dict:
    """mmtrain.memory's fastest option for the workload at ``cap_gib`` GiB, with its predicted peak and speed."""
    from mmtrain.args import ModelArguments
    from mmtrain.memory import MemorySetup, model_facts
    from mmtrain.memory.facts import ref_model_args
    from mmtrain.memory.options import best, command, model_flags, options

    model_args = ModelArguments(lm_model_name_or_path="tiny-llama", vision_model_name_or_path="tiny-clip", lang_lora_dim=4) if smoke \
        else ref_model_args("ref-7b")
    facts = model_facts(model_args)
    # Compiled decoder layers, as training does on a GPU; the workload's mean sample: one
    # image and 544 text tokens (64-1024), so a budget row holds its share of images.
    base = MemorySetup(compiled=not smoke, seq_len=facts.image_tokens + 2 + 544)
    rows = options(facts, base, int(cap_gib * GiB))
    choice = best(rows, float8_gpu=float8_gpu)
    if choice is None:
        return {"error": f"mmtrain.memory finds nothing that fits {cap_gib} GiB"}
    return {
        "name": choice.name,
        "base": choice.base,
        "zero_stage": choice.zero_stage,
        "offload": choice.offload,
        "gradient_checkpointing": choice.gradient_checkpointing,
        "max_tokens_per_batch": choice.max_tokens_per_batch,
        "predicted_peak_bytes": choice.estimate.total,
        "predicted_peak_gib": round(choice.estimate.total / GiB, 3),
        "predicted_tokens_per_s_h200": round(choice.tokens_per_s),
        "command": command(choice, model_flags(model_args), base.seq_len),
    }


def bench_argv(rec: dict, *, smoke: bool, steps: int, warmup: int, out: str) -> list[str]:
    """``benchmarks/bench.py``'s flags for a recommendation: mmtrain alone, its setting, no plain loop or profile."""
    budget = rec["max_tokens_per_batch"]
    argv = ["--plain", "skip", "--profile", "off", "--steps", str(steps), "--warmup", str(warmup), "--out", out,
            "--zero_stage", str(rec["zero_stage"]), "--offload", rec["offload"], "--max_tokens_per_batch", str(budget)]
    if smoke:
        argv += ["--lm", "tiny-llama", "--vision", "tiny-clip", "--text_tokens", "16", "48", "--lora_rank", "4"]
    else:
        argv += ["--text_tokens", "64", str(min(1024, budget - 578)), "--num_workers", "4"]  # 576 image tokens + 2 markers
        if budget < 578 + 1024:
            argv += ["--max_seq_len", str(budget)]
    if rec["gradient_checkpointing"]:
        argv += ["--gradient_checkpointing", "true"]
    if rec["base"].startswith("nf4"):
        argv += ["--quantize_base", "nf4"]
    if rec["base"] == "nf4+vision":
        argv += ["--quantize_vision", "nf4"]
    if rec["base"] == "fp8":
        argv += ["--fp8_base", "true", "--bf16_baseline", "skip"]
    return argv


def run_capped(cap_gib: float, argv: list[str]) -> dict:
    """In this process: cap the GPU, train through bench.py, and report the peaks beside the cap."""
    import bench

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), 0)
    started = time.perf_counter()
    result = bench.main(argv)
    mm = result.get("mmtrain", result)
    row = {"tokens_per_s": mm.get("tokens_per_s"), "wall_s": round(time.perf_counter() - started, 1)}
    if torch.cuda.is_available():
        row.update(max_memory_allocated=torch.cuda.max_memory_allocated(), max_memory_reserved=torch.cuda.max_memory_reserved())
    row["bench"] = mm
    return row


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", type=float, nargs="+", default=list(CAPS_GIB), help="GiB caps, one process each.")
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per cap.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first (compilation happens here).")
    parser.add_argument("--float8_gpu", action="store_true", help="Let the recommendation take float8 (the small card has float8 tensor cores).")
    parser.add_argument("--out", default="outputs/small_gpu.json", help="The JSON written.")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)  # one cap, in a process of its own
    parser.add_argument("--bench_argv", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    smoke = os.environ.get("SMOKE") == "1"

    if opts.child is not None:
        row = run_capped(opts.child, json.loads(opts.bench_argv))
        print("SMALL_GPU_ROW " + json.dumps(row, default=str), flush=True)
        return 0

    from bench import device_name, versions

    result = {
        "benchmark": SCRIPT,
        "workload": "tiny presets (SMOKE)" if smoke else "ref-7b",
        "device": device_name(),
        "versions": {**versions(), "bitsandbytes": _version("bitsandbytes")},
        "git": git_commit(),
        "command": " ".join(["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)]) + (" (SMOKE=1)" if smoke else ""),
        "note": "one large GPU limited with torch.cuda.set_per_process_memory_fraction, not the smaller card itself",
        "caps": [],
    }
    for cap in opts.caps:
        rec = recommendation(cap, smoke=smoke, float8_gpu=opts.float8_gpu)
        row = {"cap_gib": cap, "recommendation": rec}
        if "error" not in rec:
            with tempfile.TemporaryDirectory(prefix="small-gpu-") as tmp:
                child_argv = bench_argv(rec, smoke=smoke, steps=opts.steps, warmup=opts.warmup, out=os.path.join(tmp, "bench.json"))
                cmd = [sys.executable, os.path.abspath(__file__), "--child", str(cap), "--bench_argv", json.dumps(child_argv)]
                print(f"[small_gpu] cap {cap:g} GiB: {rec['name']} (predicted peak {rec['predicted_peak_gib']} GiB)", flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SMALL_GPU_ROW ")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stdout + proc.stderr)[-3000:]
                    row["error"] = f"rc {proc.returncode}" + (" (out of memory under the cap)" if "OutOfMemoryError" in tail else "")
                    row["log_tail"] = tail
                else:
                    measured = json.loads(lines[-1][len("SMALL_GPU_ROW "):])
                    row["measured"] = {k: v for k, v in measured.items() if k != "bench"}
                    row["bench_mmtrain"] = measured["bench"]
                    peak = measured.get("max_memory_allocated")
                    if peak:
                        row["under_cap"] = measured["max_memory_reserved"] <= cap * GiB
                        row["prediction_error"] = round(peak / rec["predicted_peak_bytes"] - 1, 4)
                        row["within_10_percent"] = abs(row["prediction_error"]) <= 0.10
        print(f"[small_gpu] {json.dumps({k: v for k, v in row.items() if k not in ('bench_mmtrain', 'log_tail')}, default=str)}", flush=True)
        result["caps"].append(row)
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"[small_gpu] wrote {opts.out}")
    return 0 if all("error" not in r for r in result["caps"]) else 1


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
