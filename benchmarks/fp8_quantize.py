"""Row-wise float8 quantisation: the one-pass Triton kernel beside the compiled torch operations.

For each of ref-7b's quantised widths (4,096: the inputs of q/k/v/o/gate/up and the
gradients of q/k/v/o/down; 11,008: the input of down and the gradients of gate/up) and
``--tokens`` rows: the median time of ``mmtrain.model.fp8_triton.quantize_rows`` and of
``quantize_rows_torch`` under ``torch.compile`` (what the trainer compiled before the
kernel), with and without per-column scales (the input gradient's form), and the
bandwidth each reaches counting one read of the input and one write of the float8 rows.

    python benchmarks/fp8_quantize.py --out outputs/fp8_quantize.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from provenance import git_commit  # noqa: E402

from mmtrain.model import fp8_triton  # noqa: E402
from mmtrain.model.fp8 import quantize_rows_torch  # noqa: E402


def median_ms(fn, warmup: int = 5, repeats: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=24576)
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 11008])
    p.add_argument("--out", default=None)
    opts = p.parse_args(argv)
    if not (torch.cuda.is_available() and fp8_triton.available()):
        raise SystemExit("needs a CUDA GPU and Triton")
    compiled = torch.compile(quantize_rows_torch, dynamic=False)
    rows = []
    for width in opts.widths:
        x = torch.randn(opts.tokens, width, device="cuda", dtype=torch.bfloat16)
        for column_scale in (None, torch.rand(width, device="cuda") + 0.5):
            ideal_bytes = x.numel() * (x.element_size() + 1)
            row = {"tokens": opts.tokens, "width": width, "column_scale": column_scale is not None}
            for name, fn in (("triton", fp8_triton.quantize_rows), ("torch_compiled", compiled)):
                ms = median_ms(lambda: fn(x, column_scale))
                row[f"{name}_ms"] = round(ms, 4)
                row[f"{name}_gb_per_s"] = round(ideal_bytes / ms / 1e6, 1)
            q, s = fp8_triton.quantize_rows(x, column_scale)
            q_ref, s_ref = compiled(x, column_scale)
            row["float8_values_differing"] = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            row["scales_equal"] = bool(torch.equal(s, s_ref))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "benchmarks/fp8_quantize.py",
        "device": torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": __import__("triton").__version__},
        "git": git_commit(),
        "command": "python benchmarks/fp8_quantize.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "bandwidth_convention": "one read of the bfloat16 input and one write of the float8 rows",
        "rows": rows,
    }
    if opts.out:
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
