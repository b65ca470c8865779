"""Eval: answer normalisation, the majority-answer baseline, token-weighted loss, exact-match scoring."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from mmtrain.data import IGNORE_INDEX, Collator
from mmtrain.training.evaluate import evaluate_generation, evaluate_loss, majority_baseline, normalize_answer


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("red", "red"),
        ("  Red.\n", "red"),
        ("The  Blue\tcircle.", "the blue circle"),
        ("red...", "red"),  # every trailing dot
        ("red .", "red"),  # a dot after a space leaves no trailing space
        ("3.5", "3.5"),  # dots inside stay
        ("Red!", "red!"),  # only dots are stripped
        ("", ""),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def _example(ids, answer):
    return {"input_ids": torch.tensor(ids), "pixel_values": torch.zeros(0, 3, 4, 4), "answer": answer}


def test_majority_baseline_counts_the_best_blind_guess_per_question():
    examples = [
        _example([1, 2, 3], "red"),
        _example([1, 2, 3], "Red."),  # the same answer after normalisation
        _example([1, 2, 3], "blue"),
        _example([1, 2, 4], "square"),
        _example([1, 2, 4], "circle"),
        _example([1, 2], "red"),  # a prefix of another prompt is another question
    ]
    # question [1 2 3]: "red" 2 of 3; [1 2 4]: a tie, 1 of 2; [1 2]: 1 of 1
    assert majority_baseline(examples) == pytest.approx((2 + 1 + 1) / 6)
    # prompts that differ only in their images are one question: pixels are not looked at
    examples[0]["pixel_values"] = torch.ones(1, 3, 4, 4)
    assert majority_baseline(examples) == pytest.approx(4 / 6)
    assert majority_baseline([_example([5], "a"), _example([6], "b")]) == 1.0


@pytest.fixture
def built(tiny_args):
    from mmtrain.model import build_model

    torch.manual_seed(0)
    built = build_model(tiny_args(lang_lora_dim=4, lang_lora_alpha=16))  # scale 4: the answers below were chosen at it
    with torch.no_grad():  # as if trained: LoRA's B starts at zero
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return built


def test_eval_loss_weights_every_label_token_equally(accelerator, built):
    model = built.model
    collate = Collator(built.tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(0)

    def item(prompt, answer):
        ids = torch.randint(10, 500, (prompt + answer,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(0, 3, 8, 8)}

    # one batch with 2 label tokens, one with 30: a mean of batch means would weigh them alike
    batches = [collate([item(6, 1), item(4, 1)]), collate([item(3, 20), item(5, 10)])]
    sums, counts, batch_means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], return_logits=True).logits
            targets = batch["labels"][:, 1:]
            losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            n = int((targets != IGNORE_INDEX).sum())
            sums, counts = sums + float(losses), counts + n
            batch_means.append(float(losses) / n)
    assert counts == 32
    result = evaluate_loss(accelerator, model, batches)
    assert result["label_tokens"] == 32
    assert result["loss"] == pytest.approx(sums / counts, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sums / counts), rel=1e-5)
    assert abs(result["loss"] - sum(batch_means) / 2) > 1e-3, "the batches must tell the two averages apart"
    assert model.training, "evaluation puts the model back in training mode"


def _generation_examples(tmp_path, built):
    """Four held-out questions through the data pipeline; the last two share their text."""
    from mmtrain.args import DataArguments
    from mmtrain.data import build_datasets

    for name, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        Image.new("RGB", (32, 32), color).save(tmp_path / f"{name}.png")

    def record(question, answer, image=None):
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return {"conversations": turns, **({"image": image} if image else {})}

    held_out = [
        record("<image>\nWhat color is it?", "red", "red.png"),
        record("What is two plus two?", "four"),
        record("<image>\nWhat shape is it?", "circle", "blue.png"),
        record("<image>\nWhat shape is it?", "square", "red.png"),
    ]
    (tmp_path / "eval.json").write_text(json.dumps(held_out))
    (tmp_path / "train.json").write_text(json.dumps(held_out[:1]))
    data_args = DataArguments(dataset_names=[str(tmp_path / "train.json")], eval_dataset_names=[str(tmp_path / "eval.json")])
    data = build_datasets(data_args, built.tokenizer, built.image_processor, built.image_tokens)
    examples = data.generation_examples(4)
    return sorted(examples, key=lambda e: [r["conversations"][1]["value"] for r in held_out].index(e["answer"]))


def test_generation_is_scored_by_exact_match_after_normalisation(tmp_path, accelerator, built):
    examples = _generation_examples(tmp_path, built)
    assert [e["answer"] for e in examples] == ["red", "four", "circle", "square"]
    run = dict(batch_size=3, max_new_tokens=4, zero3=False)  # 3: one full batch, one partial

    # what the model answers, read from the samples a first pass reports
    first = evaluate_generation(accelerator, built.model, built.tokenizer, examples, **run)
    said = [s["generated"] for s in first["samples"]]
    assert [s["expected"] for s in first["samples"]] == ["red", "four", "circle", "square"]
    assert all(normalize_answer(s) for s in said), f"empty answers would make the scoring test vacuous: {said}"
    assert torch.equal(examples[2]["input_ids"], examples[3]["input_ids"]), "one question text, two images"

    # a hit is the generated text up to case, surrounding space and a final dot
    examples[0]["answer"] = f"  {said[0].upper()}. "
    examples[1]["answer"] = said[1] + " extra"  # more words: a miss
    examples[2]["answer"] = said[2]
    examples[3]["answer"] = "zzz"
    result = evaluate_generation(accelerator, built.model, built.tokenizer, examples, **run)
    assert result["exact_match"] == pytest.approx(2 / 4)
    assert result["questions"] == 4
    # the last two share a question: guessing its commonest answer gets one of them
    assert result["majority_baseline"] == pytest.approx(3 / 4) == majority_baseline(examples)
    assert evaluate_generation(accelerator, built.model, built.tokenizer, [], **run) == {}


def test_processes_share_the_questions():
    """Each process answers its own share; under ZeRO-3 the shares are padded to one length (collective forwards)."""
    from mmtrain.training.evaluate import share_of_questions

    shares = [share_of_questions(5, rank, 2, equal=False) for rank in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    padded = [share_of_questions(5, rank, 2, equal=True) for rank in range(2)]
    assert padded == [[0, 2, 4], [1, 3, None]]
    assert sorted(i for share in padded for i in share if i is not None) == list(range(5))  # each question once
    assert share_of_questions(1, 3, 4, equal=True) == [None]  # fewer questions than processes: still one forward each
    assert share_of_questions(1, 3, 4, equal=False) == []
