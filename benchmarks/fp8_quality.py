"""Does a float8 base (``--fp8_base``), or a 4-bit one (``--quantize_base nf4``, ``--base nf4``), train like the bfloat16 one? Per-step loss of both on the same samples.

The language model of ref-7b (the ``llama-2-7b`` preset, random weights from one seed),
LoRA rank 16 on every Linear of its decoder layers (as ref-7b trains), bfloat16. Two runs
start from the same weights and adapters and take the same batches in the same order:
one as is, one with the decoder layers' frozen Linears converted by
:func:`mmtrain.model.fp8.convert_frozen_linears`, both with fused LoRA as training has it.
The vision tower and projector are left out: ``--fp8_base`` touches only the LM's
decoder layers, so the loss difference comes from there.

Two tasks (``--task``):

- ``markov`` (the default): every step takes a fresh batch drawn from one fixed Markov
  chain over the first 1,024 token ids, each id followed by one of 4 others. The loss
  falls from about ln(vocabulary) as the adapters learn which ids occur and which follow
  which: learning that generalises across batches, as in training, where no batch repeats
  within an epoch.
- ``memorise``: ``--batches`` batches of uniformly random tokens, cycled. Nothing
  generalises, so the loss falls only as the adapters memorise those batches; each
  step's progress depends on every gradient component. It is the hard case for float8
  (on an H200: within 0.2% over the first pass, then about 20% less progress per visit;
  ``benchmarks/README.md``), and relative differences grow as the loss nears zero.

``--base nf4`` converts the same Linears with :func:`mmtrain.model.nf4.quantize_frozen_linears`
instead (bitsandbytes' NF4, double-quantised scales, bfloat16 compute); fused LoRA then
leaves those layers to peft's forward, as in training.

``--outlier_channels N`` plants, in both runs alike, N fixed hidden channels about
``OUTLIER_FACTOR`` (100) times the others in the input of every decoder layer's
attention and MLP (their two RMSNorm weights scaled there), as trained LLMs carry them
("emergent outliers"; tests/model/fp8_outliers.py plants them in one layer): the
quantised weights' error then meets activations of that size in every product.

Reported: each step's relative difference ``|loss_fp8 - loss_bf16| / loss_bf16``, its
mean and maximum, against the target of 1%.

    python benchmarks/fp8_quality.py --out benchmarks/results/fp8_quality_h200.json
    python benchmarks/fp8_quality.py --layers 8      # a quarter of the layers: faster, same per-layer shapes
    python benchmarks/fp8_quality.py --preset tiny-llama --steps 5 --device cpu   # a dry run (CPU float8 is slow but right)
    python benchmarks/fp8_quality.py --base nf4 --outlier_channels 6 --out benchmarks/results/nf4_quality_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mmtrain import presets  # noqa: E402
from mmtrain.model.decoder_layers import decoder_layers  # noqa: E402
from mmtrain.model.fp8 import convert_frozen_linears, float8_matmul_problem  # noqa: E402
from mmtrain.model.fused_lora import fuse_lora_layers  # noqa: E402
from mmtrain.model.lora import apply_lora  # noqa: E402

TARGET = 0.01  # largest relative loss difference per step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="llama-2-7b", help="Language preset (random weights).")
    p.add_argument("--layers", type=int, default=None, help="Decoder layers kept (default: all of the preset's).")
    p.add_argument("--steps", type=int, default=100, help="Optimizer steps of each run.")
    p.add_argument("--batch", type=int, default=2, help="Sequences per step.")
    p.add_argument("--seq", type=int, default=2048, help="Tokens per sequence.")
    p.add_argument("--task", choices=("markov", "memorise"), default="markov", help="Fresh batches from one Markov chain, or cycled random batches (module docstring).")
    p.add_argument("--batches", type=int, default=10, help="memorise: distinct batches, cycled over the steps.")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", choices=("fp8", "nf4"), default="fp8", help="How the compared run holds the frozen Linears.")
    p.add_argument("--outlier_channels", type=int, default=0, help="Hidden channels planted ~100x larger in every layer's inputs (module docstring).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file to write.")
    return p.parse_args(argv)


OUTLIER_FACTOR = 100.0


def plant_outliers(model: torch.nn.Module, channels: int, seed: int) -> list[int]:
    """Scale ``channels`` fixed hidden channels of every decoder layer's two input norms by :data:`OUTLIER_FACTOR`."""
    hidden = model.config.hidden_size
    picked = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed + 2))[:channels].tolist()
    with torch.no_grad():
        for layer in decoder_layers(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[picked] *= OUTLIER_FACTOR
    return picked


def build(args, fp8: bool) -> torch.nn.Module:
    """The LM with adapters, identical for both runs (weights and adapters from ``--seed``)."""
    config = presets.preset_config(args.preset)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    device = torch.device(args.device)
    with presets.seeded_init(args.seed, device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        model.requires_grad_(False)
        apply_lora(model, rank=args.lora_rank, scope="model.layers.", alpha=None, dropout=0.0, field="lora_rank")
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(True)
                if ".lora_B" in name:  # B starts at zero in training; a small start makes the adapters matter from step 1
                    torch.nn.init.normal_(param, std=1e-3)
    model.to(device)
    if args.outlier_channels:
        plant_outliers(model, args.outlier_channels, args.seed)
    if fp8 and args.base == "fp8":
        conversion = convert_frozen_linears(model, list(decoder_layers(model)), keep_original=False, device=device)
        print(conversion.describe("base"), flush=True)
    if fp8 and args.base == "nf4":
        from mmtrain.model.nf4 import quantize_frozen_linears

        print(quantize_frozen_linears(model, list(decoder_layers(model)), device=device).describe("base"), flush=True)
    fuse_lora_layers(model)
    model.config.use_cache = False
    return model.train()


CHAIN_IDS = 1024  # markov: the token ids the chain visits
SUCCESSORS = 4  # markov: the ids that may follow each id


def batches(args, vocab: int) -> list[torch.Tensor]:
    """One batch per step (``markov``) or ``--batches`` batches to cycle (``memorise``), from ``--seed``."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    if args.task == "memorise":
        return [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.batches)]
    ids = min(CHAIN_IDS, vocab)
    successors = torch.randint(0, ids, (ids, SUCCESSORS), generator=gen)
    rows = args.steps * args.batch
    choice = torch.randint(0, SUCCESSORS, (rows, args.seq), generator=gen)
    seqs = torch.empty(rows, args.seq, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, ids, (rows,), generator=gen)
    for t in range(1, args.seq):  # all rows advance together: seq iterations in all
        seqs[:, t] = successors[seqs[:, t - 1], choice[:, t]]
    return list(seqs.split(args.batch))


def train(args, fp8: bool, data: list[torch.Tensor]) -> tuple[list[float], float]:
    model = build(args, fp8)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        ids = data[step % len(data)].to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    del model, optimizer, params
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return losses, seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    problem = float8_matmul_problem(args.device) if args.base == "fp8" else None
    if problem:
        print(f"note: {problem}; torch's CPU float8 products give the same numbers, only slowly", flush=True)
    vocab = presets.preset_config(args.preset).vocab_size
    data = batches(args, vocab)
    bf16, bf16_s = train(args, False, data)
    fp8, fp8_s = train(args, True, data)
    diffs = [abs(a - b) / abs(b) for a, b in zip(fp8, bf16)]
    result = {
        "benchmark": "benchmarks/fp8_quality.py",
        "base": args.base,
        "command": " ".join(["python", "benchmarks/fp8_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"layers": args.layers or presets.preset_config(args.preset).num_hidden_layers},
        "loss_bf16": bf16,
        f"loss_{args.base}": fp8,
        "relative_difference": diffs,
        "mean_relative_difference": sum(diffs) / len(diffs),
        "max_relative_difference": max(diffs),
        "target_max_relative_difference": TARGET,
        "within_target": max(diffs) <= TARGET,
        "seconds": {"bf16": bf16_s, args.base: fp8_s},
    }
    for step in sorted({0, len(diffs) // 2, len(diffs) - 1}):
        print(f"step {step}: bf16 {bf16[step]:.4f}  {args.base} {fp8[step]:.4f}  relative difference {100 * diffs[step]:.3f}%")
    verdict = "within" if result["within_target"] else "NOT within"
    print(
        f"relative loss difference over {args.steps} steps: mean {100 * result['mean_relative_difference']:.3f}%, "
        f"max {100 * result['max_relative_difference']:.3f}% ({verdict} the {100 * TARGET:.0f}% target); "
        f"loss {bf16[0]:.3f} -> {bf16[-1]:.3f} (bf16); {bf16_s:.0f} s bf16, {fp8_s:.0f} s {args.base} (eager)",
        flush=True,
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
