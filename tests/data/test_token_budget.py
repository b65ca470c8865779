"""Micro-batches by token budget: the plan keeps budgets full, every sample once, without a length sort."""

from __future__ import annotations

import numpy as np
import pytest

from mmtrain.data.token_budget import TokenBudgetBatchSampler, plan_batches

from .conftest import llava, save_solid, write_json


def _sizes(n=2000, seed=0):
    """Instruction-data-like items: one image (64 tokens) and 64-1024 text tokens, or text only."""
    rng = np.random.default_rng(seed)
    images = (rng.random(n) < 0.8).astype(int)
    return [(int(64 * i + t), int(i)) for i, t in zip(images, rng.integers(64, 1025, n))]


def test_plan_uses_every_item_once_within_both_budgets_and_keeps_them_full():
    sizes = _sizes()
    budget = 8192
    batches = plan_batches(sizes, budget, None, np.random.default_rng(1))
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    tokens = [sum(sizes[i][0] for i in b) for b in batches]
    assert max(tokens) <= budget
    # nearly every micro-batch is nearly full: the window finds a filler for the gap
    assert sum(tokens) / (len(batches) * budget) > 0.95
    # an image budget that binds: micro-batches are then full of images instead
    limited = plan_batches(sizes, budget, 6, np.random.default_rng(1))
    assert sorted(i for b in limited for i in b) == list(range(len(sizes)))
    images = [sum(sizes[i][1] for i in b) for b in limited]
    assert max(images) <= 6 and np.mean(images) > 5.5
    assert max(sum(sizes[i][0] for i in b) for b in limited) <= budget
    assert len(limited) > len(batches)


def test_plan_is_not_a_length_sort_and_follows_the_seed():
    sizes = _sizes()
    batches = plan_batches(sizes, 8192, None, np.random.default_rng(1))
    # where an item lands in the epoch says nothing about its length
    position = np.empty(len(sizes))
    for k, b in enumerate(batches):
        position[b] = k
    lengths = np.array([s[0] for s in sizes])
    assert abs(np.corrcoef(position, lengths)[0, 1]) < 0.1
    # each micro-batch mixes long and short items rather than holding one length class
    spread = [np.ptp([sizes[i][0] for i in b]) for b in batches if len(b) > 2]
    assert np.median(spread) > 500
    # the same seed gives the same plan; another seed (another epoch) another one
    assert plan_batches(sizes, 8192, None, np.random.default_rng(1)) == batches
    assert plan_batches(sizes, 8192, None, np.random.default_rng(2)) != batches


def test_plan_refuses_an_item_over_the_budget():
    with pytest.raises(ValueError, match="exceeds the budget of 100 tokens"):
        plan_batches([(50, 0), (101, 0)], 100, None, np.random.default_rng(0))


def test_sampler_plans_each_epoch_from_the_seed_and_joined_items_regroup(build, tmp_path):
    save_solid(tmp_path / "img.png", (200, 30, 30))
    records = [llava("<image>\nDescribe it.", " ".join(["red"] * (1 + i % 17)), image="img.png") for i in range(60)]
    path = write_json(tmp_path / "data.json", records)
    data = build([path], max_tokens_per_batch=120, dataset_concatenate_samples=3)
    sampler = TokenBudgetBatchSampler(data.train, 120, None, seed=7)
    data.train.set_epoch(0)
    first = list(sampler)
    assert len(first) == len(sampler) == len(sampler.plan(0))
    assert sorted(i for b in first for i in b) == list(range(len(data.train)))
    for batch in first:  # the plan's sizes bound the real items
        assert sum(len(data.train[i]["input_ids"]) for i in batch) <= 120
    assert sampler.plan(1) != first and data.train.epoch == 0  # planning ahead leaves the epoch alone
    data.train.set_epoch(1)
    assert list(sampler) == sampler.plan(1)
    assert TokenBudgetBatchSampler(data.train, 120, None, seed=7).plan(0) == first  # a resumed run plans the same


@pytest.mark.parametrize("policy", ["drop", "truncate_turns"])
def test_samples_over_either_budget_are_dropped_or_truncated_and_counted(build, tmp_path, policy):
    save_solid(tmp_path / "img.png", (10, 200, 30))
    long_answer = " ".join(["red"] * 200)
    records = [llava("<image>\nDescribe it.", "red", image="img.png") for _ in range(6)]
    records.append(llava("<image>\nDescribe it.", long_answer, image="img.png"))  # over the token budget
    records.append(llava("<image>\n<image>\n<image>\nDescribe them.", "red", images=["img.png"] * 3))  # over the image budget
    # two pairs, the second over the token budget: truncation keeps the first
    records.append(llava("<image>\nDescribe it.", "red", image="img.png", more=[("And again?", long_answer)]))
    path = write_json(tmp_path / "data.json", records)
    data = build([path], max_tokens_per_batch=100, max_images_per_batch=2, overlength_policy=policy)
    report = data.report
    assert report["longest_sample_kept"] == 100
    if policy == "drop":
        assert report["dropped_overlength_train"] == 3 and report["train_samples"] == 6
    else:  # a single pair cannot be cut: the long answer and the 3-image question still go
        assert report["dropped_overlength_train"] == 2 and report["truncated_train"] == 1 and report["train_samples"] == 7
    assert report["longest_sample_train"] <= 100
    sampler = TokenBudgetBatchSampler(data.train, 100, 2, seed=0)
    assert sorted(i for b in sampler for i in b) == list(range(len(data.train)))  # no crash mid-epoch


def test_flex_attention_on_a_budget_row_gives_sdpa_losses(tiny_args):
    """The kernel a budget uses on CUDA: transformers' flex attention with the document mask it builds from positions.

    CPU flex attention has no backward, so the forward is compared (the GPU tier trains with it).
    """
    import torch

    from mmtrain.data.packing import PackingCollator
    from mmtrain.model import build_model
    from tests.adapters import randomise_lora
    from tests.data.test_packing import _items

    built = build_model(tiny_args(lang_lora_dim=4))
    randomise_lora(built.model)
    items = _items(built, [(1, 9), (0, 12), (2, 4), (1, 30), (0, 3)])
    row = PackingCollator(built.tokenizer.pad_token_id, 512)(items)
    assert row["input_ids"].shape[0] == 1
    with torch.no_grad():
        sdpa = built.model(**row)
        built.model.language_model.set_attn_implementation("flex_attention")
        flex = built.model(**row)
    torch.testing.assert_close(flex.loss_sum_per_sample, sdpa.loss_sum_per_sample, rtol=1e-5, atol=1e-5)
    assert int(flex.num_label_tokens) == int(sdpa.num_label_tokens) > 0
