"""Shared-prompt pairs compute what the two halves as separate rows compute: each answer's log-probability and its gradient.

Pairs built by the real dataset from a tiny model's tokenizer: with an image, with an
earlier answered turn (labels inside the shared prompt, counted for both answers), with
answers that share their first words, text only. The same items go through the halves'
collator and the shared-prompt collator (a row per pair, and all pairs in one row), and
through SDPA under the dense mask and the variable-length reference kernel.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmtrain.args import DataArguments
from mmtrain.compat import transformers as transformers_compat
from mmtrain.data import build_datasets, read_sources
from mmtrain.data.preference import PairCollator, SharedPromptCollator, shared_prompt_length
from mmtrain.model import shared_prompt
from mmtrain.model.attention import use_packed_attention
from mmtrain.model.builder import build_model

PAIRS = [
    {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"}], "chosen": "red, quite red", "rejected": "blue"},
    {
        "image": "blue.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."},
            {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Which color?"},
        ],
        "chosen": "the color blue",
        "rejected": "the color red, surely",
    },
    {"conversations": [{"from": "human", "value": "No image here?"}], "chosen": "yes", "rejected": "no it is not"},
]


def build_pairs(tmp_path, tiny_args, **model_flags):
    """A tiny model with non-zero LoRA, and :data:`PAIRS` as its dataset's items."""
    torch.manual_seed(0)  # the same adapters whatever ran before
    built = build_model(tiny_args(lang_lora_dim=4, **model_flags))
    for name, color in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        Image.new("RGB", (40, 30), color).save(tmp_path / name)
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS))
    args = DataArguments(dataset_names=[str(path)], eval_ratio=0.0)
    data = build_datasets(args, built.tokenizer, built.image_processor, built.image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    torch.manual_seed(0)
    for name, p in built.model.named_parameters():
        if "lora_B" in name:  # not a no-op: the adapters' gradients flow through every token
            torch.nn.init.normal_(p, std=0.1)
    return built, [data.train[i] for i in range(len(data.train))]


@pytest.fixture
def pairs(tmp_path, tiny_args):
    return build_pairs(tmp_path, tiny_args)


def answers(model, batch):
    """Each answer's summed NLL and label count, and the gradients of their sum."""
    model.zero_grad()
    out = model(**batch, per_sample_grad=True)
    out.loss_sum_per_sample.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum_per_sample.detach(), out.label_tokens_per_sample, grads


@pytest.mark.parametrize("kernel", ["dense_mask", "reference", "eager"])
def test_shared_prompt_rows_give_each_answer_the_log_probability_and_gradients_of_its_own_row(tmp_path, tiny_args, kernel):
    """SDPA under the boolean mask, the varlen reference kernel, and eager attention adding the mask to its scores."""
    built, items = build_pairs(tmp_path, tiny_args, **({"attn_implementation": "eager"} if kernel == "eager" else {}))
    assert transformers_compat.attn_implementation(built.model.language_model.config) == ("eager" if kernel == "eager" else "sdpa")
    model = built.model.float()
    pad = built.tokenizer.pad_token_id
    expected, expected_tokens, expected_grads = answers(model, PairCollator(pad)(items))
    if kernel == "reference":
        use_packed_attention(model.language_model, "reference")
    for collator in (SharedPromptCollator(pad), SharedPromptCollator(pad, 8, capacity=4096)):
        batch = collator(items)
        assert "image_repeats" not in batch and batch["pixel_values"].shape[0] == 2  # each pair's image once
        logps, tokens, grads = answers(model, batch)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_layout_computes_the_prompt_once_and_each_branch_continues_its_positions(pairs):
    built, items = pairs
    batch = SharedPromptCollator(built.tokenizer.pad_token_id)(items)
    for row, item in enumerate(items):
        s = shared_prompt_length(item["input_ids"], item["labels"], item["rejected_input_ids"], item["rejected_labels"])
        chosen, rejected = item["input_ids"], item["rejected_input_ids"]
        assert s > 0 and torch.equal(chosen[: s + 1], rejected[: s + 1]) and not torch.equal(chosen[s + 1 :][:1], rejected[s + 1 :][:1])
        n = len(chosen) + len(rejected) - s
        assert batch["attention_mask"][row].sum() == n
        assert batch["input_ids"][row, :n].tolist() == chosen.tolist() + rejected[s:].tolist()
        assert batch["position_ids"][row, :n].tolist() == list(range(len(chosen))) + list(range(s, len(rejected)))
        assert batch["branch_ids"][row, :n].tolist() == [0] * s + [1] * (len(chosen) - s) + [2] * (len(rejected) - s)
    # targets inside a prompt (the second pair's earlier answer, and "the color" both its answers start with)
    # are listed for both answers; the first pair's answers differ from their first token
    positions, samples = batch["label_positions"], batch["label_samples"]

    def owned(sample):
        return set(positions[samples == sample].tolist())

    assert not owned(0) & owned(len(items))
    assert len(owned(1) & owned(len(items) + 1)) > 3


def test_the_dense_mask_lets_a_branch_see_its_prompt_and_itself_only():
    documents = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, -1]])
    branches = torch.tensor([[0, 1, 1, 2, 2, 0, 1, 2, -1]])
    mask = shared_prompt.dense_mask(documents, branches)[0, 0]
    assert mask[3].tolist() == [True, False, False, True, False, False, False, False, False]  # rejected: prompt and itself
    assert mask[4].tolist() == [True, False, False, True, True, False, False, False, False]
    assert mask[2].tolist() == [True, True, True, False, False, False, False, False, False]
    assert mask[7].tolist() == [False] * 5 + [True, False, True, False]  # the next pair starts afresh
    assert mask[8].tolist() == [False] * 8 + [True]  # padding sees itself only
    additive = shared_prompt.dense_mask(documents, branches, torch.float32)[0, 0]
    assert torch.equal(additive == 0, mask)


def test_a_gpu_without_the_varlen_kernel_keeps_the_halves_as_rows(tmp_path, tiny_args, caplog):
    """The decision the trainer makes once the LM is built: on a CPU the mask carries the shared rows; on a GPU
    only FlashAttention-2's varlen kernel does (else each row would need a dense mask), and the log says why not."""
    import logging

    from mmtrain.args import TrainArguments
    from mmtrain.training.speedups import shares_prompt

    built, _ = build_pairs(tmp_path, tiny_args)
    dpo = TrainArguments(objective="dpo")
    model_args = tiny_args(lang_lora_dim=4)
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        assert shares_prompt(built, model_args, dpo, "cpu")
        assert not shares_prompt(built, model_args, dpo, "cuda")  # the LM was not switched to the varlen kernel
    assert "FlashAttention-2's variable-length kernel cannot run here" in caplog.text
    use_packed_attention(built.model.language_model, "reference")  # a varlen kernel, as a GPU run with FlashAttention-2 has
    assert shares_prompt(built, model_args, dpo, "cuda")
    assert not shares_prompt(built, model_args, TrainArguments(objective="dpo", dpo_share_prompt=False), "cpu")
    assert not shares_prompt(built, tiny_args(lang_lora_dim=4, enable_mmca_attention=True), dpo, "cpu")
