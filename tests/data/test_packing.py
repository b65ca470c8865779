"""Padding-free packing: layout of the packed batch, and the same losses and gradients as padding."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mmtrain.data import Collator
from mmtrain.data.packing import PackingCollator, first_fit_rows
from mmtrain.model.attention import check_packed_attention
from mmtrain.data.template import IGNORE_INDEX
from mmtrain.model import build_model
from tests.adapters import randomise_lora


def test_first_fit_rows_respects_capacity_and_keeps_every_sample():
    lengths = [7, 3, 5, 2, 9, 1, 4]
    rows = first_fit_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 31 tokens need at least 4 rows of 10; first-fit decreasing finds 4
    with pytest.raises(ValueError, match="max_seq_len"):
        first_fit_rows([11], capacity=10)


def _items(built, specs, seed=0):
    """Dataset-like items: ``specs`` is a list of (images, text tokens); labels on the text after the images."""
    gen = torch.Generator().manual_seed(seed)
    it = built.image_tokens
    size = built.model.vision.image_size
    items = []
    for images, text in specs:
        ids = [1]
        for _ in range(images):
            ids += it.span() + [11]
        answer = torch.randint(20, 200, (text,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * len(ids) + answer
        items.append(
            {
                "input_ids": torch.tensor(ids + answer),
                "labels": torch.tensor(labels),
                "pixel_values": torch.randn(images, 3, size, size, generator=gen),
            }
        )
    return items


def test_packed_batch_layout(tiny_args):
    built = build_model(tiny_args())
    items = _items(built, [(1, 9), (0, 12), (2, 4), (1, 30)])
    lengths = [len(i["input_ids"]) for i in items]
    capacity = max(lengths) + min(lengths)
    batch = PackingCollator(built.tokenizer.pad_token_id, capacity)(items)
    rows, length = batch["input_ids"].shape
    assert rows < len(items) and length <= capacity
    assert int(batch["attention_mask"].sum()) == sum(lengths)
    assert int(batch["image_counts"].sum()) == batch["pixel_values"].shape[0] == 4
    for r in range(rows):
        docs = batch["document_ids"][r]
        pos = batch["position_ids"][r]
        for d in docs.unique().tolist():
            where = (docs == d).nonzero()[:, 0]
            assert torch.equal(pos[where], torch.arange(len(where)))  # positions restart per sample
            if d >= 0:
                assert batch["labels"][r, where[0]] == IGNORE_INDEX  # first token never a target
        assert (batch["attention_mask"][r] == (docs >= 0)).all()
    # images follow the placeholders row by row: row r's images are its samples' images, in order
    image_rows = (batch["input_ids"] == built.image_tokens.image_id).sum(1) // built.image_tokens.per_image
    assert torch.equal(image_rows, batch["image_counts"])


def _per_sample_losses(model, batch, n_samples):
    """Summed next-token loss of each sample, from the logits (packed or padded)."""
    out = model(**batch, return_logits=True)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX)
    token = token.view(targets.shape)
    if "document_ids" in batch:
        return out, token, targets
    return out, token.sum(1), targets


def _packed_sample_sums(token, batch, order):
    """Per-sample sums of a packed batch, in the original sample order."""
    docs = batch["document_ids"][:, 1:]
    sums = {}
    for r, row in enumerate(order):
        for d, sample in enumerate(row):
            sums[sample] = token[r][docs[r] == d].sum()
    return torch.stack([sums[i] for i in range(len(sums))])


@pytest.mark.parametrize("mmca", [None, "same_image", "self"])
def test_packed_equals_padded_losses_and_gradients(tiny_args, mmca):
    kwargs = {"lang_lora_dim": 4, "lang_lora_alpha": 4}  # scale 1, as the tolerances were set for
    if mmca:
        kwargs.update(enable_mmca_attention=True, mmca_image_attention=mmca)
    built = build_model(tiny_args(**kwargs))
    model = built.model
    randomise_lora(model)
    items = _items(built, [(1, 9), (0, 12), (2, 4), (1, 30), (0, 3)])
    lengths = [len(i["input_ids"]) for i in items]
    capacity = max(lengths) + 20
    packer = PackingCollator(built.tokenizer.pad_token_id, capacity)
    packed = packer(items)
    order = first_fit_rows(lengths, capacity)
    assert packed["input_ids"].shape[0] < len(items)
    padded = Collator(built.tokenizer.pad_token_id)(items)

    def run(batch):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        (out.loss * out.num_label_tokens).backward()  # summed loss: same scale in both layouts
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        return out, grads

    out_pad, grads_pad = run(padded)
    out_pack, grads_pack = run(packed)
    assert int(out_pad.num_label_tokens) == int(out_pack.num_label_tokens)
    torch.testing.assert_close(out_pack.loss, out_pad.loss, rtol=1e-5, atol=1e-6)
    assert grads_pad.keys() == grads_pack.keys() and any(".lora_" in n for n in grads_pad)
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], rtol=1e-4, atol=1e-6, msg=name)

    with torch.no_grad():
        _, per_pad, _ = _per_sample_losses(model, padded, len(items))
        _, token, _ = _per_sample_losses(model, packed, len(items))
    per_pack = _packed_sample_sums(token, packed, order)
    torch.testing.assert_close(per_pack, per_pad, rtol=1e-5, atol=1e-5)


def test_packing_really_isolates_samples(tiny_args):
    """Without the block mask a sample would see its row neighbours: check the mask is what keeps them apart."""
    built = build_model(tiny_args())
    model = built.model
    items = _items(built, [(0, 10), (0, 10)])
    packed = PackingCollator(built.tokenizer.pad_token_id, 64)(items)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        isolated = model(**packed).loss
        leaked = model(**{**packed, "document_ids": None}).loss  # plain causal mask over the whole row
    assert not torch.allclose(isolated, leaked)


def test_packed_batch_without_positions_is_refused(tiny_args):
    built = build_model(tiny_args())
    packed = PackingCollator(built.tokenizer.pad_token_id, 256)(_items(built, [(0, 4), (0, 4)]))
    with pytest.raises(ValueError, match="position_ids"):
        built.model(**{**packed, "position_ids": None})


@pytest.mark.parametrize("attention", ["sdpa", "eager", "mmca"])
def test_mask_builder_keeps_packed_samples_apart(tiny_args, attention):
    kwargs = {"enable_mmca_attention": True} if attention == "mmca" else {"attn_implementation": attention}
    built = build_model(tiny_args(**kwargs))
    check_packed_attention(built.model.language_model.config)  # raises if samples could see each other


def test_mask_builder_check_fails_loudly_when_packing_is_not_honoured(tiny_args, monkeypatch):
    import transformers.masking_utils as masking

    built = build_model(tiny_args())
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match="packed samples would attend to each other"):
        check_packed_attention(built.model.language_model.config)


def test_pad_to_multiple_of_applies_to_packed_rows(tiny_args):
    """--packing --pad_to_multiple_of 64: the trainer's packing collator rounds each packed row up to 64."""
    from mmtrain.args import DataArguments, ModelArguments
    from mmtrain.training.speedups import make_train_collator

    built = build_model(tiny_args())
    data_args = DataArguments(packing=True, pad_to_multiple_of=64, max_seq_len=300)
    collator = make_train_collator(built, ModelArguments(), data_args)
    batch = collator(_items(built, [(0, 9), (1, 12), (0, 5)]))
    assert batch["input_ids"].shape[1] % 64 == 0
    assert int(batch["cu_seq_lens"][-1]) == batch["input_ids"].numel()  # the padding tails are blocks of their own
