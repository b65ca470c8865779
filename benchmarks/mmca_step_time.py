"""Step time of a LLaMA layer stack with multi-modal causal attention (MMCA) on vs off.

Times forward + backward of the decoder (random weights, nothing downloaded) on one
multi-image-shaped sequence per sample: a text prompt, ``--images`` spans of
``<im_start>`` + ``--image_tokens`` image tokens + ``<im_end>``, then text to ``--seq``.
Weights are frozen, as in LoRA training; the backward runs through every layer to the
input embeddings. On and off alternate within each repeat; the median of each is kept,
with a device sync around every step.

CPU smoke check (tiny preset):

    python benchmarks/mmca_step_time.py

The GPU measurement (target: MMCA on <= 1.3x the step time of off):

    python benchmarks/mmca_step_time.py --preset llama-2-7b --layers 4 --seq 2048 \\
        --image_tokens 576 --dtype bf16 --device cuda

Writes ``benchmarks/results/mmca_step_time_<device>.json`` (device, versions, command,
milliseconds on/off, ratio, peak memory on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mmtrain import presets  # noqa: E402
from mmtrain.model.mmca import IMAGE_MASK_KWARG, enable_mmca  # noqa: E402
from mmtrain.model.decoder_layers import enable_checkpointing  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_RATIO = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-llama", help="Language preset whose layer shape is timed.")
    p.add_argument("--layers", type=int, default=None, help="Decoder layers to stack (default: all of the preset's).")
    p.add_argument("--seq", type=int, default=256, help="Tokens per sample.")
    p.add_argument("--batch", type=int, default=1, help="Samples per step.")
    p.add_argument("--image_tokens", type=int, default=64, help="Image tokens per image (576: CLIP ViT-L/14 at 336 px).")
    p.add_argument("--images", type=int, default=1, help="Images per sample.")
    p.add_argument("--prompt_tokens", type=int, default=32, help="Text before the first image (a system prompt).")
    p.add_argument("--image_attention", default="same_image", choices=["same_image", "self"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N).")
    p.add_argument("--checkpointing", action="store_true", help="Activation checkpointing on the layers.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps per mode.")
    p.add_argument("--repeats", type=int, default=10, help="Timed steps per mode.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/mmca_step_time_<device>.json).")
    return p.parse_args(argv)


def image_layout(args: argparse.Namespace) -> torch.Tensor:
    """``[batch, seq]`` bool: where the image tokens are."""
    span = args.image_tokens + 2
    needed = args.prompt_tokens + args.images * span + 1
    if needed > args.seq:
        raise SystemExit(f"--seq {args.seq} is too short for {args.images} image(s) of {args.image_tokens} tokens after a {args.prompt_tokens}-token prompt")
    is_image = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    position = args.prompt_tokens
    gap = (args.seq - needed) // max(args.images, 1)
    for _ in range(args.images):
        is_image[:, position + 1 : position + 1 + args.image_tokens] = True
        position += span + gap
    return is_image


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_stack(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    config = presets.preset_config(args.preset)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    torch.manual_seed(args.seed)
    with device:
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    if args.checkpointing:
        enable_checkpointing(model)  # the trainer's own switch (both of transformers' names for it)
    model.train()
    return model, config


def step(model, embeds: torch.Tensor, extra: dict) -> None:
    embeds = embeds.detach().requires_grad_()
    hidden = model(inputs_embeds=embeds, use_cache=False, **extra).last_hidden_state
    hidden.float().square().mean().backward()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model, config = build_stack(args, device, dtype)
    embeds = torch.randn(args.batch, args.seq, config.hidden_size, device=device, dtype=dtype)
    is_image = image_layout(args).to(device)

    modes = {"off": ("sdpa", {}), "on": (None, {IMAGE_MASK_KWARG: is_image})}
    times: dict[str, list[float]] = {"off": [], "on": []}
    peak: dict[str, int] = {}

    def use(mode: str) -> dict:
        name, extra = modes[mode]
        if name is None:
            enable_mmca(model, args.image_attention)
        else:
            model.set_attn_implementation(name)
        return extra

    for mode in modes:
        extra = use(mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step(model, embeds, extra)
        sync(device)
        if device.type == "cuda":
            peak[mode] = torch.cuda.max_memory_allocated(device)
    for _ in range(args.repeats):
        for mode in modes:
            extra = use(mode)
            sync(device)
            start = time.perf_counter()
            step(model, embeds, extra)
            sync(device)
            times[mode].append((time.perf_counter() - start) * 1000)

    ms = {mode: statistics.median(samples) for mode, samples in times.items()}
    result = {
        "device": device_name(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
        "command": " ".join(["python", "benchmarks/mmca_step_time.py", *sys.argv[1:]]) if argv is None else " ".join(argv),
        "settings": {k: v for k, v in vars(args).items() if k != "output"} | {"layers": config.num_hidden_layers},
        "ms_off": round(ms["off"], 3),
        "ms_on": round(ms["on"], 3),
        "ratio": round(ms["on"] / ms["off"], 3),
        "target_ratio": TARGET_RATIO,
        "samples_ms": {mode: [round(t, 3) for t in samples] for mode, samples in times.items()},
    }
    if peak:
        result["peak_memory_gib"] = {mode: round(b / 2**30, 3) for mode, b in peak.items()}
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"mmca_step_time_{device_slug(device)}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"{result['device']}: off {result['ms_off']:.1f} ms, on {result['ms_on']:.1f} ms, ratio {result['ratio']:.2f} -> {output}")
    return result


if __name__ == "__main__":
    main()
