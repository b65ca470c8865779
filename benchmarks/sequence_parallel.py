"""Sequence parallelism on ref-7b: one 32k-token sample of 8 images + text, split over two GPUs or not.

    python benchmarks/sequence_parallel.py --runs memory --out benchmarks/results/sequence_parallel_h200_memory.json
    python benchmarks/sequence_parallel.py --runs loss --out benchmarks/results/sequence_parallel_h200_loss.json
    python benchmarks/sequence_parallel.py --smoke --out /tmp/sp.json          # tiny presets on the CPU: the script itself

Every run is the real entry point (``accelerate launch mmtrain/train.py``) with ZeRO-2 (the
presets draw their random weights on the GPU), bfloat16, eager decoder layers (compilation is
off under the split, so off for one GPU too), LoRA rank 16, the MLP projector, a
token budget of one sample per micro-batch, on a generated LLaVA-format dataset: samples of
8 random 336x336 images and random words, each as close under ``--tokens`` as the presets'
tokenizer allows (the answer, which carries the labels, is its last ``--answer_fraction``).

``--runs memory``: the same settings (no activation checkpointing) on one GPU
(``--sequence_parallel_size 1``: expected to run out of memory, as ``mmtrain.memory``
predicts) and on two (``--sequence_parallel_size 2``); tokens/s per GPU from the trainer's
own ``metrics.jsonl`` (every logged step after the first, which includes warm-up).

``--runs loss``: both with ``--gradient_checkpointing`` (which fits one GPU), the same
samples and seed: the per-step losses, and their largest relative difference (target
< 1e-3: bfloat16 activations, the row computed whole or in two halves).

The JSON holds each run's command, exit status, whether it ran out of memory, its losses
and tokens/s, ``mmtrain.memory``'s prediction, the device and versions
(``bench.versions``) and the commit (``provenance.git_commit``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from provenance import git_commit  # noqa: E402

WORDS = (
    "the red square sits left of a blue circle while green lines cross over yellow triangles near the top edge "
    "every shape has a size and a colour and some are small others large many overlap a few stand alone"
).split()


def write_dataset(folder: str, samples: int, tokens: int, images: int, vision: str, answer_fraction: float, seed: int) -> dict:
    """LLaVA-format records of ``images`` random images and random words, each just under ``tokens`` tokens; returns its sizes.

    The text of each record is cut, word by word, until the presets' tokenizer counts at most
    what the budget leaves after the image spans and 256 tokens for the chat template.
    """
    from PIL import Image

    from mmtrain.presets import build_preset_tokenizer, preset_config

    rng = random.Random(seed)
    tokenizer = build_preset_tokenizer()
    config = preset_config(vision)
    image_tokens = images * ((config.image_size // config.patch_size) ** 2 + 2)  # patches and the two markers
    text_budget = max(tokens - image_tokens - 256, 16)
    paths = []
    for k in range(images):
        path = os.path.join(folder, f"image{k}.png")
        size = config.image_size
        Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))).save(path)
        paths.append(path)
    records, text_tokens = [], []
    for _ in range(samples):
        words = [rng.choice(WORDS) for _ in range(2 * text_budget)]
        count = len(tokenizer(" ".join(words), add_special_tokens=False).input_ids)
        while count > text_budget:  # cut in proportion, then check again
            words = words[: max(1, int(len(words) * text_budget / count) - 1)]
            count = len(tokenizer(" ".join(words), add_special_tokens=False).input_ids)
        cut = int(len(words) * (1 - answer_fraction))
        question, answer = " ".join(words[:cut]), " ".join(words[cut:])
        records.append({"images": paths, "conversations": [
            {"from": "human", "value": "<image>\n" * images + question}, {"from": "gpt", "value": answer},
        ]})
        text_tokens.append(count)
    path = os.path.join(folder, "long.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return {"path": path, "samples": samples, "images_per_sample": images, "image_tokens": image_tokens, "text_tokens": text_tokens,
            "budget_tokens": tokens}


def run_flags(opts, data: dict, out: str, sp: int, checkpointing: bool) -> list[str]:
    flags = {
        "lm_model_name_or_path": opts.lm, "vision_model_name_or_path": opts.vision, "vis_proj": "mlp", "lang_lora_dim": "16",
        "dataset_names": data["path"], "max_seq_len": str(opts.tokens), "max_tokens_per_batch": str(opts.tokens),
        "max_images_per_batch": str(opts.images), "max_num_image_per_sample": str(opts.images),
        "eval_ratio": "0", "eval_generate": "0", "export_each_epoch": "false", "logging_steps": "1",
        "max_steps": str(opts.steps), "num_train_epochs": "1", "seed": "0", "learning_rate": "1e-4",
        "sequence_parallel_size": str(sp), "gradient_checkpointing": str(checkpointing).lower(), "output_dir": out,
        "torch_compile": "false",  # off under the split; off for one GPU too, so both compute alike
    }
    return [part for k, v in flags.items() for part in (f"--{k}", v)]


def launch(opts, data: dict, tmp: str, name: str, sp: int, checkpointing: bool) -> dict:
    out = os.path.join(tmp, name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "accelerate_configs", "zero2.yaml"),
           "--num_processes", str(sp), "--num_machines", "1", "--main_process_port", str(29500 + random.randint(1, 2000))]
    if opts.smoke:
        cmd += ["--mixed_precision", "no"]
    cmd += [os.path.join(ROOT, "mmtrain", "train.py"), *run_flags(opts, data, out, sp, checkpointing)]
    print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    print(output[-3000:], flush=True)
    records = []
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    timed = train[1:] or train
    rate = sum(r["tokens_per_s"] for r in timed) / len(timed) if timed else None
    return {
        "name": name, "sequence_parallel_size": sp, "gpus": sp, "gradient_checkpointing": checkpointing,
        "command": " ".join(cmd[1:]), "exit_code": proc.returncode, "seconds": round(seconds, 1),
        "out_of_memory": "out of memory" in output.lower() or "OutOfMemoryError" in output,
        "losses": {r["step"]: r["loss"] for r in train},
        "tokens_per_step": train[0]["tokens_per_step"] if train else None,
        "tokens_per_s": rate, "tokens_per_s_per_gpu": rate / sp if rate else None,
        "prediction_gib": prediction(opts, sp, checkpointing),
        "error_tail": output[-1500:] if proc.returncode else None,
    }


def prediction(opts, sp: int, checkpointing: bool) -> float | None:
    """``mmtrain.memory``'s predicted peak per GPU (GiB) for the run; None for the smoke models."""
    if opts.smoke:
        return None
    from mmtrain.memory import MemorySetup, estimate, model_facts, ref_model_args

    setup = MemorySetup(zero_stage=2, num_gpus=sp, seq_len=opts.tokens, images_per_sample=opts.images,
                        gradient_checkpointing=checkpointing, sequence_parallel=sp)
    return round(estimate(model_facts(ref_model_args("ref-7b")), setup).total / 2**30, 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", choices=("memory", "loss", "all"), default="all")
    parser.add_argument("--tokens", type=int, default=32768, help="Tokens of each sample, image tokens included (and the budget).")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--answer_fraction", type=float, default=0.1)
    parser.add_argument("--lm", default="llama-2-7b")
    parser.add_argument("--vision", default="clip-vit-large-patch14-336")
    parser.add_argument("--smoke", action="store_true", help="Tiny presets, 512 tokens, 2 images, 2 steps, fp32 (a CPU check of the script).")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args(argv)
    if opts.smoke:
        opts.lm, opts.vision, opts.tokens, opts.images, opts.samples, opts.steps = "tiny-llama", "tiny-clip", 512, 2, 4, 2
    from bench import device_name, versions

    result = {"bench": "sequence_parallel", "device": device_name(), "versions": versions(), "git": git_commit(),
              "workload": {"lm": opts.lm, "vision": opts.vision, "tokens": opts.tokens, "images": opts.images, "zero_stage": 2,
                           "precision": "fp32" if opts.smoke else "bf16", "lora_rank": 16}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="mmtrain-sp-") as tmp:
        result["data"] = write_dataset(tmp, opts.samples, opts.tokens, opts.images, opts.vision, opts.answer_fraction, seed=0)
        plan = []
        if opts.runs in ("memory", "all"):
            plan += [("sp1_no_ckpt", 1, False), ("sp2_no_ckpt", 2, False)]
        if opts.runs in ("loss", "all"):
            plan += [("sp1_ckpt", 1, True), ("sp2_ckpt", 2, True)]
        for name, sp, ckpt in plan:
            result["runs"].append(launch(opts, result["data"], tmp, name, sp, ckpt))
    runs = {r["name"]: r for r in result["runs"]}
    if "sp1_ckpt" in runs and "sp2_ckpt" in runs:
        one, two = runs["sp1_ckpt"]["losses"], runs["sp2_ckpt"]["losses"]
        shared = sorted(set(one) & set(two))
        result["loss_max_relative_difference"] = max((abs(two[s] - one[s]) / abs(one[s]) for s in shared), default=None)
        result["loss_steps_compared"] = len(shared)
    if "sp2_no_ckpt" in runs:
        result["sp2_trains_where_sp1_runs_out_of_memory"] = (
            runs["sp2_no_ckpt"]["exit_code"] == 0 and runs.get("sp1_no_ckpt", {}).get("out_of_memory", False)
        )
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    with open(opts.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "versions")}, indent=2))
    for r in result["runs"]:
        print(f"{r['name']}: exit {r['exit_code']}, oom {r['out_of_memory']}, tokens/s per GPU {r['tokens_per_s_per_gpu']}, "
              f"losses {r['losses']}, predicted {r['prediction_gib']} GiB")
    return result


if __name__ == "__main__":
    main()
