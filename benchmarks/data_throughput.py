"""Data-loading throughput: samples/s of read + tokenise + image preprocessing.

Runs the real pipeline (``build_datasets`` on the synthetic set, the ``tiny-clip``
image processor, ``Collator``) through a torch DataLoader with several worker counts,
prints a table and writes ``benchmarks/results/data_throughput.json``.

    python benchmarks/data_throughput.py                       # 3000 samples, workers 0 and 2
    python benchmarks/data_throughput.py --workers 0 2 4 --per_image 576
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtrain import presets  # noqa: E402
from mmtrain.args import DataArguments  # noqa: E402
from mmtrain.data import Collator, build_datasets  # noqa: E402
from mmtrain.model.tokens import add_image_tokens  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    import datasets
    import PIL
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": PIL.__version__,
    }


def measure(dataset, collator, batch_size: int, num_workers: int, epochs: int) -> dict:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=collator,
        persistent_workers=num_workers > 0,
    )
    first_batch_s = None
    samples = images = tokens = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - start
            samples += batch["input_ids"].shape[0]
            images += batch["pixel_values"].shape[0]
            tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return {
        "num_workers": num_workers,
        "batch_size": batch_size,
        "epochs": epochs,
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 1),
        "images_per_s": round(images / seconds, 1),
        "tokens_per_s": round(tokens / seconds, 1),
        "first_batch_s": round(first_batch_s or 0.0, 3),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=3000, help="synthetic samples to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to compare")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the train split per measurement")
    parser.add_argument("--per_image", type=int, default=64, help="image tokens per image (tiny-clip + mlp: 64)")
    parser.add_argument("--concatenate", type=int, default=1, help="--dataset_concatenate_samples")
    parser.add_argument("--data_path", default=None, help="where the synthetic set goes (default: a temporary folder)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_throughput.json"))
    args = parser.parse_args(argv)

    tokenizer = presets.build_preset_tokenizer()
    image_tokens = add_image_tokens(tokenizer, args.per_image)
    image_processor = presets.build_preset_image_processor(presets.preset_config("tiny-clip"))
    with tempfile.TemporaryDirectory() as tmp:
        data_args = DataArguments(
            data_path=args.data_path or tmp,
            synthetic_num_samples=args.num_samples,
            dataset_concatenate_samples=args.concatenate,
        )
        start = time.perf_counter()
        bundle = build_datasets(data_args, tokenizer, image_processor, image_tokens, seed=0)
        build_s = time.perf_counter() - start  # includes generating the set on a first run
        collator = Collator(tokenizer.pad_token_id)
        runs = [measure(bundle.train, collator, args.batch_size, w, args.epochs) for w in args.workers]

    print(f"build_datasets (generate + load + check + measure lengths): {build_s:.2f} s, {len(bundle.train)} train items")
    print(f"{'workers':>8} {'samples/s':>10} {'images/s':>10} {'tokens/s':>10} {'first batch s':>14}")
    for r in runs:
        print(f"{r['num_workers']:>8} {r['samples_per_s']:>10} {r['images_per_s']:>10} {r['tokens_per_s']:>10} {r['first_batch_s']:>14}")
    result = {
        "command": ("python benchmarks/data_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "device": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "versions": versions(),
        "settings": vars(args) | {"output": os.path.relpath(args.output)},
        "build_datasets_s": round(build_s, 3),
        "train_items": len(bundle.train),
        "report": bundle.report,
        "runs": runs,
    }
    result["report"]["sources"] = {os.path.basename(k): v for k, v in result["report"]["sources"].items()}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.relpath(args.output)}")
    return result


if __name__ == "__main__":
    main()
