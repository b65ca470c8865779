"""Pairs packed into one row under a token budget give each answer the log-probability it has padded.

The preference loss reads each answer's summed log-probability (``loss_sum_per_sample``):
packing must keep the samples apart (attention, positions, image features in order) and
sum every label into its own sample.
"""

from __future__ import annotations

import torch

from mmtrain.args import DataArguments
from mmtrain.data import build_datasets, read_sources
from mmtrain.data.preference import PairCollator, PairPackingCollator
from mmtrain.training.preference import PreferenceObjective
from mmtrain.training.reference import ReferencePolicy
from tests.data.test_preference import THREE_PAIRS, _pairs


def test_packed_pairs_give_the_padded_pairs_answer_log_probabilities_and_preference_loss(tmp_path, tiny_args):
    from mmtrain.model import build_model

    built = build_model(tiny_args())
    model = built.model.eval()
    args = DataArguments(dataset_names=[_pairs(tmp_path, THREE_PAIRS)], eval_ratio=0.0, max_tokens_per_batch=1024)
    data = build_datasets(args, built.tokenizer, built.image_processor, built.image_tokens, sources=read_sources(args, pairs=True), pairs=True)
    items = [data.train[i] for i in range(len(data.train))]
    padded = PairCollator(built.tokenizer.pad_token_id)(items)
    packed = PairPackingCollator(built.tokenizer.pad_token_id, 1024)(items)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 6

    with torch.no_grad():
        a, b = model(**padded), model(**packed)
    torch.testing.assert_close(b.label_tokens_per_sample, a.label_tokens_per_sample, rtol=0, atol=0)
    torch.testing.assert_close(b.loss_sum_per_sample, a.loss_sum_per_sample, rtol=1e-5, atol=1e-5)

    # Through the objective (reference pass, then the policy's with per-sample gradients),
    # after the trained tensors moved so that the margins are not all zero.
    reference = ReferencePolicy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    objective = PreferenceObjective(model, reference, beta=0.5, kind="sigmoid", sft_weight=0.0)
    results = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        model.zero_grad(set_to_none=True)
        result = objective(model, dict(batch))
        result.loss.mean().backward()
        results[name] = (result.metrics(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert results["padded"][0][:, 2].abs().max() > 0  # margins moved
    torch.testing.assert_close(results["packed"][0], results["padded"][0], rtol=1e-4, atol=1e-5)
    for got, expected in zip(results["packed"][1], results["padded"][1]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
