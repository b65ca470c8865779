"""Eval: token-weighted loss and perplexity, preference metrics of held-out pairs, and exact-match accuracy by generation."""

from __future__ import annotations

import math
from collections import Counter

import torch

from mmtrain.model.generation import SamplingOptions, generate
from mmtrain.training.preference import METRICS
from mmtrain.training.sample_record import INDICES_KEY


@torch.no_grad()
def evaluate_loss(accelerator, model, loader) -> dict[str, float]:
    """Loss averaged over every label token of the eval set (not a mean of batch means).

    Per-sample sums go through ``gather_for_metrics``, which drops the samples Accelerate
    repeats to give every process the same number of batches, so the figure is exact.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        out = model(**batch)
        sums, counts = accelerator.gather_for_metrics((out.loss_sum_per_sample.double(), out.label_tokens_per_sample.double()))
        loss_sum += sums.sum()
        tokens += counts.sum()
    model.train()
    if tokens.item() == 0:  # no eval set (--eval_ratio 0) or no answer in it: there is no loss to report
        return {"label_tokens": 0}
    loss = (loss_sum / tokens).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "label_tokens": int(tokens.item())}


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def share_of_questions(count: int, rank: int, world_size: int, *, equal: bool) -> list[int | None]:
    """The questions (indices into ``count``) process ``rank`` answers: every ``world_size``-th, from ``rank``.

    ``equal`` pads each share to the same length with ``None`` (a question answered again, not
    counted): under ZeRO-3 each forward gathers parameters collectively, so every process
    must run the same number of them.
    """
    share: list[int | None] = list(range(rank, count, world_size))
    if equal:
        share += [None] * (-(-count // world_size) - len(share))
    return share


@torch.no_grad()
def evaluate_generation(accelerator, model, tokenizer, examples: list[dict], *, batch_size: int, max_new_tokens: int, zero3: bool) -> dict:
    """Greedy answers to held-out questions; exact match after light normalisation.

    The processes share the questions (:func:`share_of_questions`) and sum their hits.
    """
    if not examples:
        return {}
    model.eval()
    share = share_of_questions(len(examples), accelerator.process_index, accelerator.num_processes, equal=zero3)
    correct = 0
    options = SamplingOptions(max_new_tokens=max_new_tokens)
    samples = []
    for start in range(0, len(share), batch_size):
        chunk = share[start : start + batch_size]
        asked = [examples[0 if i is None else i] for i in chunk]  # a padding slot asks question 0 again, uncounted
        outputs = generate(
            model,
            [e["input_ids"] for e in asked],
            [e["pixel_values"] for e in asked],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            options=options,
            image_sizes=[e["image_sizes"] for e in asked] if "image_sizes" in asked[0] else None,
            videos=[e.get("pixel_values_videos") for e in asked],
            synced_gpus=zero3 and accelerator.num_processes > 1,
        )
        for i, e, ids in zip(chunk, asked, outputs):
            if i is None:
                continue
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            correct += normalize_answer(answer) == normalize_answer(e["answer"])
            if len(samples) < 4:
                samples.append({"expected": e["answer"], "generated": answer})
    model.train()
    correct = int(accelerator.reduce(torch.tensor(float(correct), device=accelerator.device), "sum").item())
    return {"exact_match": correct / len(examples), "majority_baseline": majority_baseline(examples), "questions": len(examples), "samples": samples}


def majority_baseline(examples: list[dict]) -> float:
    """Accuracy of the best blind guess: the most frequent answer *for each question text*.

    Prompts that differ only in their images tokenise identically (image spans are the
    same ids), so grouping by prompt ids groups by question; a model that ignores the
    image can do no better than this.
    """
    groups: dict[tuple, Counter] = {}
    for e in examples:
        groups.setdefault(tuple(e["input_ids"].tolist()), Counter())[normalize_answer(e["answer"])] += 1
    return sum(c.most_common(1)[0][1] for c in groups.values()) / len(examples)


@torch.no_grad()
def evaluate_preference(accelerator, model, loader, objective) -> dict[str, float]:
    """Held-out pairs under ``--objective dpo``: the loss and :data:`mmtrain.training.preference.METRICS`, means over every pair.

    Per-pair values go through ``gather_for_metrics`` (the pairs Accelerate repeats to even
    out the processes are dropped), so the means are exact.
    """
    model.eval()
    sums = torch.zeros(1 + len(METRICS), dtype=torch.float64, device=accelerator.device)
    pairs = 0
    for batch in loader:
        indices = batch.pop(INDICES_KEY, None)  # with --precompute_ref: the reference's values are looked up by them
        result = objective(model, batch, indices, split="eval")
        values = torch.cat([result.loss.detach()[:, None], result.metrics()], dim=1)
        values = accelerator.gather_for_metrics(values.double())
        sums += values.sum(dim=0)
        pairs += values.shape[0]
    model.train()
    if pairs == 0:
        return {"pairs": 0}
    means = (sums / pairs).tolist()
    return {"loss": means[0], **dict(zip(METRICS, means[1:])), "pairs": pairs}
