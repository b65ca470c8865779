"""Eval: token-weighted loss and perplexity, and exact-match accuracy by generation."""

from __future__ import annotations

import math
from collections import Counter

import torch

from mmtrain.model.generation import SamplingOptions, generate


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
    loss = (loss_sum / tokens.clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "label_tokens": int(tokens.item())}


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@torch.no_grad()
def evaluate_generation(accelerator, model, tokenizer, examples: list[dict], *, batch_size: int, max_new_tokens: int, zero3: bool) -> dict:
    """Greedy answers to held-out questions; exact match after light normalisation.

    Every process answers the same questions: under ZeRO-3 each forward gathers
    parameters collectively, so all ranks must run the same number of forwards.
    """
    if not examples:
        return {}
    model.eval()
    correct = 0
    options = SamplingOptions(max_new_tokens=max_new_tokens)
    samples = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        outputs = generate(
            model,
            [e["input_ids"] for e in chunk],
            [e["pixel_values"] for e in chunk],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            options=options,
            synced_gpus=zero3 and accelerator.num_processes > 1,
        )
        for e, ids in zip(chunk, outputs):
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            hit = normalize_answer(answer) == normalize_answer(e["answer"])
            correct += hit
            if len(samples) < 4:
                samples.append({"expected": e["answer"], "generated": answer})
    model.train()
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
