"""Sequence parallelism through DeepSpeed's Ulysses attention, on two gloo processes of this CPU.

Both processes build the same tiny model and take the same batch; each computes the LM on
its half of every row (:func:`mmtrain.data.sequence_shard.shard_batch`), DeepSpeed's
all-to-all exchanging heads for positions inside each attention layer. The loss summed
over the two halves and the gradients summed over the two processes must be those of one
process computing the whole rows: packed rows of several samples with images (their
segments kept apart by the varlen kernel after the exchange) and padded rows of one sample,
with fused LoRA and activation checkpointing on (the recomputed layers exchange again).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmtrain.model import sequence_parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(built):
    from mmtrain.data import Collator
    from mmtrain.data.packing import PackingCollator
    from tests.data.test_packing import _items

    pad = built.tokenizer.pad_token_id
    # Packed: two rows, samples with 0-2 images each, padding tails; the 2-fold split puts
    # sample boundaries and image spans on both sides of the cut.
    items = _items(built, [(1, 9), (0, 12), (2, 4), (1, 30), (0, 3)])
    packed = PackingCollator(pad, 180, pad_to_multiple_of=2)(items)
    assert packed["input_ids"].shape[0] == 2
    padded = Collator(pad, pad_to_multiple_of=2)(_items(built, [(2, 7), (1, 15)], seed=3))
    return {"packed": packed, "padded": padded}


def _loss_sum_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    total = out.loss * out.num_label_tokens
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), out.num_label_tokens.detach(), grads


def _worker(rank: int, folders: dict, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from mmtrain.args import ModelArguments
    from mmtrain.data.sequence_shard import shard_batch
    from mmtrain.model import build_model
    from mmtrain.model.config import SpeedOptions
    from tests.adapters import randomise_lora

    deepspeed.init_distributed(dist_backend="gloo")
    args = ModelArguments(
        lm_model_name_or_path=folders["tiny-llama"], vision_model_name_or_path=folders["tiny-clip"], lang_lora_dim=4, lang_lora_alpha=4
    )
    torch.manual_seed(0)  # the projector's initial weights: the same on both processes
    built = build_model(args, speed=SpeedOptions(packed_attention="reference", fused_lora=True, gradient_checkpointing=True))
    model = built.model.train()
    randomise_lora(model)
    batches = _batches(built)
    # One process, whole rows: before the attention is wrapped.
    whole = {name: _loss_sum_and_grads(model, batch) for name, batch in batches.items()}
    group, group_rank = sequence_parallel.enable_sequence_parallel(model.language_model, 2, micro_batch=2)
    results = {}
    for name, batch in batches.items():
        total, count, grads = _loss_sum_and_grads(model, shard_batch(batch, group_rank, 2))
        sums = torch.stack([total, count.to(total.dtype)])
        dist.all_reduce(sums, group=group)
        for grad in grads.values():
            dist.all_reduce(grad, group=group)
        ref_total, ref_count, ref_grads = whole[name]
        results[name] = {
            "loss": float(sums[0] / sums[1]),
            "whole_loss": float(ref_total / ref_count),
            "tokens": int(sums[1]),
            "whole_tokens": int(ref_count),
            "own_tokens": int(count),
            "grad_names": sorted(grads) == sorted(ref_grads) and len(grads) > 0,
            "grad_error": max(float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)) for n in grads),
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_two_processes_split_each_row_with_the_loss_and_gradients_of_one(model_folders, tmp_path):
    folders = {k: str(v) for k, v in model_folders.items()}
    mp.spawn(_worker, args=(folders, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in results.items():
            assert r["tokens"] == r["whole_tokens"] > 0, (name, r)  # every answer token counted once over the group
            assert 0 < r["own_tokens"] < r["tokens"], (name, r)  # both halves hold answer tokens
            assert r["loss"] == pytest.approx(r["whole_loss"], rel=1e-5), (name, r)
            assert r["grad_names"], (name, r)
            assert r["grad_error"] < 1e-4, (name, r)


def test_split_problems_name_what_cannot_be_shared(model_folders):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_folders["tiny-llama"])  # 4 heads, 2 key/value heads
    assert sequence_parallel.split_problem(config, 2, mmca=False) is None
    assert sequence_parallel.split_problem(config, 4, mmca=False) is None  # key/value heads replicated
    assert "attention heads" in sequence_parallel.split_problem(config, 3, mmca=False)
    assert "MMCA" in sequence_parallel.split_problem(config, 2, mmca=True)
    config.sliding_window, config.use_sliding_window = 16, True
    assert "sliding window" in sequence_parallel.split_problem(config, 2, mmca=False)
