"""Timing shared by both systems of the throughput bench: warm-up, timed epochs, memory readings, a profiler summary.

A system is a ``step(batch)`` function returning (loss, counted tokens, padded
positions), the first two possibly device tensors: they are read only after the timed
region, so the host never waits for the device inside it.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time

import torch

from flops import figures


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_now() -> dict:
    if not torch.cuda.is_available():
        return {}
    return {"allocated_bytes": torch.cuda.memory_allocated(), "peak_allocated_bytes": torch.cuda.max_memory_allocated()}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# Timed epochs
# --------------------------------------------------------------------------------------


def timed_run(step, warm_loader, loader, lengths: list[int], epochs: int, shape: dict, peak_tflops: float, set_epoch=None) -> dict:
    """Warm up on ``warm_loader``, then time ``epochs`` passes over ``loader``.

    ``step(batch)`` returns (loss, counted tokens, padded positions), the first two
    possibly device tensors that are read only after the timed region; step times are
    therefore host-side times per step, the device being synchronised around the whole
    region. ``lengths`` are the per-sample lengths of one pass over ``loader``.
    """
    peak_reset()
    static = memory_now().get("allocated_bytes")
    warm_start = time.perf_counter()
    warm_losses = [step(batch)[0] for batch in warm_loader]
    sync()
    if os.environ.get("RANK", "0") == "0":
        print(f"[bench] warm-up: {len(warm_losses)} steps in {time.perf_counter() - warm_start:.1f} s", flush=True)
    warm_peak = memory_now().get("peak_allocated_bytes")
    per_epoch, step_times, losses, data_s, data_max, first_waits = [], [], [], 0.0, 0.0, []
    counted = padded = 0
    seconds = 0.0
    for epoch in range(epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        sync()
        # The clock starts once the epoch's first batch is in hand. Getting it starts the
        # loader's worker processes (forked at a cost that grows with the parent's host memory:
        # the float8 run holds the original weights there), plans the epoch's batches and
        # starts the workers' pipeline: paid once per epoch of a real run, not per step, and
        # recorded as ``first_batch_wait_s``. (Creating the iterator alone starts nothing: the
        # training loop's is a generator.) Every later batch's wait is timed.
        it = iter(loader)
        t0 = time.perf_counter()
        first = next(it, None)
        first_waits.append(time.perf_counter() - t0)
        batches = itertools.chain([] if first is None else [first], it)
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            loss, tokens, positions = step(batch)
            t2 = time.perf_counter()
            data_s += t1 - t0
            data_max = max(data_max, t1 - t0)
            step_times.append(t2 - t0)
            losses.append(loss)
            counted += tokens
            padded += positions
        sync()
        elapsed = time.perf_counter() - start
        seconds += elapsed
        per_epoch.append(figures(elapsed, lengths, shape, peak_tflops))
    out = figures(seconds, lengths * epochs, shape, peak_tflops)
    losses = [float(loss) for loss in losses]
    counted = int(counted)
    out.update(
        steps=len(step_times),
        warmup_steps=len(warm_losses),
        step_s_median=statistics.median(step_times),
        step_s_mean=statistics.fmean(step_times),
        data_wait_s=data_s,
        data_wait_max_s=data_max,
        first_batch_wait_s=first_waits,
        tokens_counted_by_loop=counted,
        padded_positions=padded,
        padding_fraction=1 - counted / padded if padded else 0.0,
        loss_first=losses[0],
        loss_last=losses[-1],
        per_epoch=per_epoch if epochs > 1 else None,
    )
    if torch.cuda.is_available():
        out.update(
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            warmup_peak_allocated_bytes=warm_peak,
            static_allocated_bytes=static,
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    return out


def across_ranks(result: dict, lengths: list[int], epochs: int, shape: dict, peak_tflops: float | None) -> dict:
    """One rank's :func:`timed_run` result made the whole group's: every process passes its own.

    ``lengths`` are the samples of one pass over all ranks together. The group's time is
    the slowest rank's (the steps end in a collective, so the ranks differ by little);
    tokens/s is the group's total, MFU is per GPU (the group's FLOP/s over ``ranks`` peaks).
    Peak memory is listed per rank, in rank order.
    """
    import torch.distributed as dist

    ranks = dist.get_world_size()
    mine = {k: result.get(k) for k in ("seconds", "peak_allocated_bytes", "peak_reserved_bytes", "tokens_counted_by_loop", "padded_positions", "step_s_median")}
    every = [None] * ranks
    dist.all_gather_object(every, mine)
    seconds = max(r["seconds"] for r in every)
    group = figures(seconds, lengths * epochs, shape, peak_tflops * ranks if peak_tflops else None)
    out = dict(result)
    out.update(group)
    out.update(
        num_processes=ranks,
        tokens_per_s_per_gpu=group["tokens_per_s"] / ranks,
        seconds_per_rank=[r["seconds"] for r in every],
        step_s_median_per_rank=[r["step_s_median"] for r in every],
        tokens_counted_by_loop=sum(int(r["tokens_counted_by_loop"]) for r in every),
        padded_positions=sum(int(r["padded_positions"]) for r in every),
    )
    out["padding_fraction"] = 1 - out["tokens_counted_by_loop"] / out["padded_positions"] if out["padded_positions"] else 0.0
    if every[0]["peak_allocated_bytes"] is not None:
        peaks = [r["peak_allocated_bytes"] for r in every]
        out.update(
            peak_allocated_bytes=max(peaks),
            peak_allocated_gib=max(peaks) / 2**30,
            peak_allocated_gib_per_rank=[p / 2**30 for p in peaks],
            peak_reserved_bytes=max(r["peak_reserved_bytes"] for r in every),
        )
    return out


# --------------------------------------------------------------------------------------
# Profiler summary
# --------------------------------------------------------------------------------------


_CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_mha")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "matmul", "splitk", "gemv")),
    ("loss", ("cross_entropy", "log_softmax", "softmax", "nll_loss")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_amp_", "clip", "norm_kernel")),
    ("copies", ("memcpy", "memset", "copy_", "cat", "index")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_steps(step, batches, steps: int) -> dict:
    """Profile ``steps`` calls of ``step(batch)``: device time by kernel group, host gaps, top ops."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    it = iter(batches)
    sync()
    wall = time.perf_counter()
    data_s = 0.0
    with profile(activities=activities) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            with record_function("data"):
                batch = next(it)
            data_s += time.perf_counter() - t
            step(batch)
        sync()
    wall = time.perf_counter() - wall
    events = prof.key_averages()
    device_events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]

    def dev_time(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    by_cat: dict[str, float] = {}
    for e in device_events:
        by_cat[_category(e.key)] = by_cat.get(_category(e.key), 0.0) + dev_time(e) / 1e6
    busy = sum(by_cat.values())
    top = sorted(device_events, key=dev_time, reverse=True)[:25]
    cpu_top = sorted(events, key=lambda e: float(getattr(e, "cpu_time_total", 0.0)), reverse=True)[:15]
    summary = {
        "steps": steps,
        "wall_s": wall,
        "device_busy_s": busy,
        "host_gaps_s": max(wall - busy, 0.0),
        "data_s": data_s,
        "device_s_by_group": {k: round(v, 6) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "device_share_by_group": {k: round(v / busy, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])} if busy else {},
        "top_kernels": [
            {"name": e.key[:160], "group": _category(e.key), "calls": int(e.count), "device_ms": round(dev_time(e) / 1e3, 3)} for e in top
        ],
        "top_host_ops": [
            {"name": e.key[:160], "calls": int(e.count), "cpu_total_ms": round(float(e.cpu_time_total) / 1e3, 3)} for e in cpu_top
        ],
    }
    sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    try:
        summary["table"] = events.table(sort_by=sort_key, row_limit=25, max_name_column_width=60)
    except Exception as e:  # the table is a convenience; the numbers above are the record
        summary["table"] = f"unavailable: {e}"
    return summary


def profile_or_error(step, loader, steps: int) -> dict:
    """:func:`profile_steps` over the first ``steps`` batches of ``loader``; a failure is recorded, not raised."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == steps:
            break
    try:
        return profile_steps(step, batches, len(batches))
    except Exception as e:  # a profiler failure must not lose the measurement
        return {"error": f"{type(e).__name__}: {e}"}
