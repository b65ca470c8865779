"""Data at scale: start-up time, host RSS and samples/s of the in-memory and the streamed input.

Generates N synthetic records (``--records``, e.g. 10K and 1M) that share a few hundred
small images, written twice: as one LLaVA JSON list (the in-memory input) and as
JSONL shards (the ``--streaming`` input). Every configuration (records x input x
loader workers) runs in a child process of its own, and reports its own peak RSS: the
``VmHWM`` of its address space. Not ``getrusage``'s ``ru_maxrss``: on Linux a process
started by ``fork``/``vfork`` + ``exec`` keeps its parent's peak in it (here the parent
holding a million generated records, 1.1 GiB, which every child then "had"), and
``RUSAGE_CHILDREN`` is the largest of all children. The
child times the real data path up to the first batch (read and check the records,
measure lengths, build the loader, first batch: the start-up) and then samples/s over
``--batches`` more batches; with workers it also reports their summed unique memory
(USS), which the parent's RSS does not include.

    python benchmarks/data_scale.py --records 10000 1000000 --workers 0 8

The generated sets go under ``outputs/data_scale/`` (ignored by git) and are deleted
at the end unless ``--keep``. The result goes to ``benchmarks/results/data_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# Runnable from a checkout without installing the package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.data_throughput import cpu_name, versions  # noqa: E402
from mmtrain.data.synthetic import generate_synthetic  # noqa: E402

SHARDS = 128  # divisible by the process x worker counts benchmarked, so each worker reads whole shards
DISTINCT_IMAGES = 300
BATCH_SIZE = 16


def generate(folder: str, records: int) -> None:
    """``folder/train.json`` (one list), ``folder/part-*.jsonl`` (shards) and ``folder/eval.jsonl``, sharing the images.

    The records cycle through the synthetic set's conversations and images; each gets an
    id and a numbered question of its own, so that none is a byte-copy of another.
    """
    base = generate_synthetic(os.path.join(folder, "base"), DISTINCT_IMAGES, seed=0)
    with open(base) as f:
        pool = json.load(f)
    for record in pool:
        record["images"] = [os.path.join("base", p) for p in record.get("images", [])]
    lines = []
    for i in range(records):
        record = dict(pool[i % len(pool)])
        turns = [dict(t) for t in record["conversations"]]
        turns[0]["value"] += f" (#{i})"
        record["conversations"], record["id"] = turns, f"scale-{i}"
        lines.append(json.dumps(record))
    per_shard = -(-records // SHARDS)
    for s in range(SHARDS):
        with open(os.path.join(folder, f"part-{s:03d}.jsonl"), "w") as f:
            f.write("\n".join(lines[s * per_shard : (s + 1) * per_shard]) + "\n")
    with open(os.path.join(folder, "train.json"), "w") as f:
        f.write("[\n" + ",\n".join(lines) + "\n]\n")
    with open(os.path.join(folder, "eval.jsonl"), "w") as f:
        f.write("\n".join(lines[:32]) + "\n")


def peak_rss_mib() -> float:
    """This process's peak resident memory since its ``exec`` (``VmHWM``, Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(folder: str, streaming: bool, workers: int, batches: int) -> dict:
    """One configuration in this process: start-up to the first batch, then samples/s; peak RSS of this process."""
    import psutil  # a dependency of accelerate
    from accelerate import Accelerator

    from mmtrain import presets
    from mmtrain.args import DataArguments
    from mmtrain.data import Collator, build_datasets
    from mmtrain.data.build import read_sources
    from mmtrain.model.tokens import add_image_tokens
    from mmtrain.training.setup import make_loader
    from mmtrain.training.stream_loader import StreamLoader

    tokenizer = presets.build_preset_tokenizer()
    image_tokens = add_image_tokens(tokenizer, 64)
    image_processor = presets.build_preset_image_processor(presets.preset_config("tiny-clip"))
    rss_before = peak_rss_mib()
    names = [os.path.join(folder, "part-*.jsonl")] if streaming else [os.path.join(folder, "train.json")]
    data_args = DataArguments(
        dataset_names=names, eval_dataset_names=[os.path.join(folder, "eval.jsonl")], streaming=streaming, num_workers=workers,
    )
    start = time.perf_counter()
    sources = read_sources(data_args, seed=0)
    bundle = build_datasets(data_args, tokenizer, image_processor, image_tokens, seed=0, sources=sources)
    collator = Collator(tokenizer.pad_token_id)
    if streaming:
        loader = StreamLoader(Accelerator(cpu=True), bundle.train, collator, BATCH_SIZE, record_samples=False, num_workers=workers)
    else:
        loader = make_loader(bundle.train, collator, BATCH_SIZE, workers, shuffle=True, seed=0)
    iterator = iter(loader)
    samples = next(iterator)["input_ids"].shape[0]
    startup_s = time.perf_counter() - start
    start, counted = time.perf_counter(), 0
    for _ in range(batches):
        counted += next(iterator)["input_ids"].shape[0]
    seconds = time.perf_counter() - start
    workers_uss = sum(child.memory_full_info().uss for child in psutil.Process().children(recursive=True)) / 2**20
    del iterator
    return {
        "input": "streaming" if streaming else "in-memory",
        "num_workers": workers,
        "startup_s": round(startup_s, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_before_data_mib": round(rss_before, 1),  # tokenizer, processor and imports: the same in every configuration
        "workers_uss_mib": round(workers_uss, 1),
        "samples_per_s": round(counted / seconds, 1),
        "measured_samples": counted + samples,
    }


def run_child(folder: str, streaming: bool, workers: int, batches: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", folder, "--workers", str(workers), "--batches", str(batches)]
    if streaming:
        command.append("--streaming")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 1_000_000], help="dataset sizes to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 8], help="loader worker counts")
    parser.add_argument("--batches", type=int, default=150, help=f"batches of {BATCH_SIZE} timed after the first")
    parser.add_argument("--work_dir", default=os.path.join(REPO, "outputs", "data_scale"), help="where the sets are generated")
    parser.add_argument("--keep", action="store_true", help="keep the generated sets")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "data_scale.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.streaming, args.workers[0], args.batches)))
        return {}

    runs = []
    for records in args.records:
        folder = os.path.join(args.work_dir, f"records-{records}")
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        generate(folder, records)
        generate_s = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith((".json", ".jsonl")))
        print(f"{records} records: generated in {generate_s:.1f} s, {size / 2**20:.0f} MiB of JSON")
        for streaming in (False, True):
            for workers in args.workers:
                run = {"records": records, **run_child(folder, streaming, workers, args.batches)}
                runs.append(run)
                print(f"  {run['input']:>9} workers={workers}: start-up {run['startup_s']} s, peak RSS {run['peak_rss_mib']} MiB "
                      f"(+ workers' USS {run['workers_uss_mib']} MiB), {run['samples_per_s']} samples/s")
        if not args.keep:
            shutil.rmtree(folder)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": ("python benchmarks/data_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "commit": commit,
        "device": {
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "note": "CPU only; with fewer cores than workers the workers share the cores (oversubscribed)",
        },
        "versions": versions(),
        "settings": {"batch_size": BATCH_SIZE, "timed_batches": args.batches, "shards": SHARDS, "distinct_images": DISTINCT_IMAGES,
                     "image_tokens": 64, "shuffle_buffer_size": 1000, "vision": "tiny-clip (64x64)"},
        "runs": runs,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.relpath(args.output, REPO)}")
    return result


if __name__ == "__main__":
    main()
