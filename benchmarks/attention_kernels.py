"""Attention kernels for packed rows: forward and forward+backward time of one LM layer's attention.

A token-budget micro-batch is one row of several samples; attention must stay inside each
sample (causal within it). This times the kernels that can do that on one row of
``--tokens`` tokens (LLaMA-2-7B's 32 heads of 128 by default), bfloat16:

- ``flex``: flex attention with a document-causal block mask, compiled (what mmtrain uses
  for packed rows on CUDA where FlashAttention-2 cannot run);
- ``flash_varlen``: FlashAttention-2's variable-length kernel (``aten._flash_attention_forward``
  with cumulative sequence offsets), the trainer's default (``mmtrain.model.varlen_attention.varlen_attention``).
  cuDNN's variable-length call (``aten._cudnn_attention_forward`` with offsets) was
  measured here on torch 2.11 at 5 TFLOP/s with wrong query and key gradients
  (``attention_kernels_h200_*.json`` at ca89e13) and is no longer offered;
- ``cudnn_dense`` (only when every sample has the same length): the samples as a batch of
  equal rows through cuDNN's ordinary causal attention, what the trainer runs for such rows
  (``varlen_attention.equal_segments_sdpa``);
- ``flex_*``: flex attention with kernel options (``FLEX_VARIANTS``), and ``flex_autotune``
  compiled with ``max-autotune-no-cudagraphs``, which searches flex's block sizes itself.
  Options that help can reach the trainer's layers through transformers' ``kernel_options``.

Every kernel's output and input gradients are compared with per-sample causal SDPA in
float32 on the same inputs. Medians of ``--repeats`` timed runs after warm-up, CUDA events.

    python benchmarks/attention_kernels.py --docs 2048 --out outputs/attention_2048.json
    python benchmarks/attention_kernels.py --docs mix --out outputs/attention_mix.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # benchmarks/ (not a package) and this checkout's mmtrain
    if _path not in sys.path:
        sys.path.insert(0, _path)
from mmtrain.model import varlen_attention  # noqa: E402
from provenance import git_commit  # noqa: E402



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="Tokens in the packed row.")
    p.add_argument("--docs", default="2048", help="Sample length (every sample the same) or 'mix': 578 image + 64-1024 text tokens each.")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--kernels", nargs="+", default=["flex", "flash_varlen", "cudnn_dense", *FLEX_VARIANTS, "flex_autotune"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# Flex attention kernel options to try beside its defaults (torch's names; an option a
# torch version lacks, or a block size that does not fit, is recorded as that kernel's error).
FLEX_VARIANTS = {
    "flex_rows_safe": {"ROWS_GUARANTEED_SAFE": True},  # causal: every query row keeps its diagonal
    "flex_tma": {"USE_TMA": True},
    "flex_fwd_128x128": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
}
# Not tried any more: backward blocks of 64x128 / 128x64 (on torch 2.11 flex fell back to its
# unfused backward, which materialises the scores and ran out of memory at 16,384 tokens).


def document_lengths(tokens: int, docs: str, seed: int) -> list[int]:
    if docs != "mix":
        length = int(docs)
        return [length] * (tokens // length)
    rng, lengths = random.Random(seed), []
    while True:
        n = 578 + rng.randint(64, 1024)
        if sum(lengths) + n > tokens:
            return lengths
        lengths.append(n)


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    # Two products of L x L x d per head, half of them masked: 2 * 2 * L^2 * d * H / 2.
    return sum(2.0 * n * n * head_dim * heads for n in lengths)


def reference(q, k, v, lengths):
    """Per-sample causal SDPA in float32: q, k, v [T, H, D] -> [T, H, D] (the trainer's ``reference`` kernel)."""
    return varlen_attention.segments_sdpa(q.float(), k.float(), v.float(), cu_seqlens(lengths, q.device))


def make_flex(lengths, heads, device, kernel_options=None, mode=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.cat([torch.full((n,), i, dtype=torch.int32, device=device) for i, n in enumerate(lengths)])

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    total = len(doc)
    mask = create_block_mask(document_causal, None, None, total, total, device=device)
    compiled = torch.compile(flex_attention, dynamic=False, mode=mode)

    def run(q, k, v):  # [T, H, D]
        o = compiled(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=mask, kernel_options=kernel_options)
        return o.squeeze(0).transpose(0, 1)

    return run


def cu_seqlens(lengths, device):
    return torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)


def make_kernel(name, lengths, heads, device):
    cu, max_len = cu_seqlens(lengths, device), max(lengths)
    if name == "flex":
        return make_flex(lengths, heads, device)
    if name in FLEX_VARIANTS:
        return make_flex(lengths, heads, device, kernel_options=FLEX_VARIANTS[name])
    if name == "flex_autotune":
        return make_flex(lengths, heads, device, mode="max-autotune-no-cudagraphs")
    if name in varlen_attention.VARLEN_KERNELS:  # the trainer's own kernels (--packed_attention)
        return lambda q, k, v: varlen_attention.varlen_attention(name, q, k, v, cu, max_len, None)
    if name == "cudnn_dense":
        if len(set(lengths)) != 1:
            return None
        # The stream [T, H, D] as one row [1, H, T, D], split into its equal samples by the trainer's own path.
        return lambda q, k, v: varlen_attention.equal_segments_sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), lengths[0])[0]
    raise ValueError(name)


def time_ms(fn, warmup, repeats) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_kernels: needs a CUDA device (these are GPU kernels); nothing was timed")
        return {}
    device = torch.device("cuda")
    lengths = document_lengths(opts.tokens, opts.docs, opts.seed)
    total = sum(lengths)
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    q, k, v = (torch.randn(total, opts.heads, opts.head_dim, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    grad = torch.randn(total, opts.heads, opts.head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = reference(qr, kr, vr, lengths)
    ref.backward(grad.float())
    flops = causal_flops(lengths, opts.heads, opts.head_dim)

    results = {}
    for name in opts.kernels:
        stage = "set-up"
        try:
            kernel = make_kernel(name, lengths, opts.heads, device)
            if kernel is None:
                results[name] = {"skipped": "samples of different lengths"}
                continue
            qi, ki, vi = (t.detach().clone().requires_grad_() for t in (q, k, v))
            stage = "forward"
            out = kernel(qi, ki, vi)
            stage = "backward"
            out.backward(grad)
            errors = {
                "out": relative_error(out, ref),
                "dq": relative_error(qi.grad, qr.grad),
                "dk": relative_error(ki.grad, kr.grad),
                "dv": relative_error(vi.grad, vr.grad),
            }

            def forward():
                with torch.no_grad():
                    kernel(q, k, v)

            def forward_backward():
                qi.grad = ki.grad = vi.grad = None
                kernel(qi, ki, vi).backward(grad)

            fwd = time_ms(forward, opts.warmup, opts.repeats)
            both = time_ms(forward_backward, opts.warmup, opts.repeats)
            results[name] = {
                "forward_ms": round(fwd, 3),
                "forward_backward_ms": round(both, 3),
                "backward_ms": round(both - fwd, 3),
                "forward_tflops": round(flops / fwd / 1e9, 1),
                "backward_tflops": round(2.5 * flops / (both - fwd) / 1e9, 1),
                "relative_error_vs_fp32": {key: round(val, 5) for key, val in errors.items()},
            }
        except Exception as e:  # a kernel this torch or GPU lacks is recorded, not fatal
            results[name] = {"error": f"{type(e).__name__}: {e}"[:600], "stage": stage, "where": traceback.format_exc().splitlines()[-3:]}
        kernel = qi = ki = vi = out = None  # a failed kernel's memory is not the next one's problem
        gc.collect()
        torch.cuda.empty_cache()
        print(name, json.dumps(results[name]), flush=True)

    record = {
        "benchmark": "benchmarks/attention_kernels.py",
        "device": torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version()},
        "git": git_commit(),
        "command": "python benchmarks/attention_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "tokens": total,
        "samples": len(lengths),
        "sample_lengths": lengths,
        "heads": opts.heads,
        "head_dim": opts.head_dim,
        "flops_forward": flops,
        "flops_convention": "causal: 2 * L^2 * d * H per sample forward (half of 4 L^2 d H); backward counted as 2.5x forward",
        "flex_variants": FLEX_VARIANTS,
        "kernels": results,
    }
    if opts.out:
        os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
