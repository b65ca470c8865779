"""Row-wise float8 quantisation in one pass over the input: a Triton kernel for CUDA (opt-in).

What :func:`mmtrain.model.fp8.quantize_rows` computes, each row's largest magnitude
mapped to float8's largest value, needs the whole row before it can scale any of it.
Compiled from torch operations, inductor splits rows wider than 1,024 elements (every
LM width) into a loop that reads the row once for its maximum and again to scale it.
Here one program holds one row in registers: it reads the row once (multiplied by
per-column scales on the way in, for the input gradient's product), takes its maximum,
and writes the float8 row and its scale.

Measured on an H200 (``benchmarks/fp8_quantize.py``, 24,576 rows; benchmarks/README.md)
it is not yet the faster path: 1.2x the compiled torch operations at width 4,096 but
0.7x at 11,008, and ref-7b's float8 run was 1.4% slower with it. The second read of
inductor's loop mostly hits the L2 cache, so the torch path already reaches 1.5-1.9 TB/s.
The trainer therefore compiles the torch operations unless ``MMTRAIN_FP8_QUANTIZE=triton``
asks for this kernel, which is kept, tested on the GPU, as the starting point for one
that reaches the memory bandwidth.

No library does this: torchao's float8 training casts through its own tensor subclass
with the weight cast per step (:mod:`mmtrain.model.fp8` says why it is not used), and
its row-wise cast is inductor-compiled torch, the two-pass code above.

``torch.library.triton_op`` registers the kernel as an operator that torch.compile
traces into (the decoder layers are compiled), with its shapes derived for tracing from
the Python wrapper. Where Triton is missing (CPU-only installs) :func:`available` is
False and :mod:`mmtrain.model.fp8` uses the torch operations instead; both give the
same float8 values (``tests/model/test_fp8_triton.py``).
"""

# No ``from __future__ import annotations``: torch.library reads the operator schema from
# the annotations, as objects.
from typing import Optional

import torch

FLOAT8 = torch.float8_e4m3fn
_FLOAT8_MAX = float(torch.finfo(FLOAT8).max)
# The smallest maximum a row is scaled by: an all-zero row (padding) must not divide by zero.
MIN_AMAX = 1e-12

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only torch ships without Triton
    triton = None


def available() -> bool:
    """Whether this install has Triton (the kernel still needs a CUDA tensor to run)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, column_scale_ptr, q_ptr, scale_ptr, width, x_row_stride,
        HAS_COLUMN_SCALE: tl.constexpr, BLOCK: tl.constexpr, FLOAT8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        x = tl.load(x_ptr + row * x_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
        if HAS_COLUMN_SCALE:
            x = x * tl.load(column_scale_ptr + columns, mask=inside, other=0.0)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), MIN_AMAX)
        # As torch computes them, so that the float8 values match the torch path's: a tensor
        # divided by a number is multiplied by its float32 reciprocal; tensor by tensor is a
        # correctly rounded division.
        scale = amax * (1.0 / FLOAT8_MAX)
        q = tl.clamp(tl.math.div_rn(x, scale), -FLOAT8_MAX, FLOAT8_MAX)
        tl.store(q_ptr + row * width + columns, q.to(tl.float8e4nv), mask=inside)
        tl.store(scale_ptr + row, scale)

    @triton_op("mmtrain::quantize_rows_float8", mutates_args={})
    def _quantize_rows_op(x: torch.Tensor, column_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = x.shape
        q = torch.empty((rows, width), dtype=FLOAT8, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(width)
        # About 16 elements a thread: 8 warps for a 4,096-wide row, 16 for 11,008.
        warps = min(max(block // 512, 4), 16)
        wrap_triton(_quantize_rows_kernel)[(rows,)](
            x, x if column_scale is None else column_scale, q, scale, width, x.stride(0),
            HAS_COLUMN_SCALE=column_scale is not None, BLOCK=block, FLOAT8_MAX=_FLOAT8_MAX, MIN_AMAX=MIN_AMAX,
            num_warps=warps,
        )
        return q, scale


def quantize_rows(x: torch.Tensor, column_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x * column_scale`` [T, K] (CUDA, last dimension contiguous) as float8 with one float32 scale per row ([T, 1])."""
    if triton is None:
        raise RuntimeError("the Triton float8 quantisation needs Triton, which this torch install lacks")
    if x.dim() != 2 or x.stride(-1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    if column_scale is not None:
        column_scale = column_scale.reshape(-1).float().contiguous()
    return _quantize_rows_op(x, column_scale)
