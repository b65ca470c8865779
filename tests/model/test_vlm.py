"""The composed model on tiny real checkpoints: shapes, gradients, image order, projectors."""

import pytest
import torch

from mmtrain.model import build_model
from mmtrain.model.builder import count_parameters
from mmtrain.batch import IGNORE_INDEX


def _batch(built, n_images_per_row=(1, 2), text=(5, 7, 9)):
    """A right-padded batch with image spans and labels on the last text tokens."""
    it = built.image_tokens
    rows, labels = [], []
    for n in n_images_per_row:
        ids = [3]
        for _ in range(n):
            ids += it.span() + [11]
        ids += list(text)
        lab = [IGNORE_INDEX] * (len(ids) - len(text)) + list(text)
        rows.append(ids)
        labels.append(lab)
    length = max(map(len, rows))
    pad = built.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    label_t = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for lab in labels])
    size = built.model.vision.image_size
    pixels = torch.randn(sum(n_images_per_row), 3, size, size)
    return dict(input_ids=input_ids, attention_mask=attention, labels=label_t, pixel_values=pixels)


@pytest.mark.parametrize("lm", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("vision", ["tiny-clip", "tiny-siglip"])
def test_images_in_loss_out(model_folders, tiny_args, lm, vision):
    built = build_model(tiny_args(lm_model_name_or_path=model_folders[lm], vision_model_name_or_path=model_folders[vision]))
    out = built.model(**_batch(built))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert int(out.num_label_tokens) == 2 * 3  # 3 labelled tokens per row, each a next-token target


@pytest.mark.parametrize("proj", ["baseline", "mlp", "vit", "perceiver"])
def test_each_projector_maps_vision_width_to_lm_width(tiny_args, proj):
    built = build_model(tiny_args(vis_proj=proj, perceiver_num_queries=5))
    model = built.model
    features = torch.randn(3, model.vision.num_patches, model.vision.hidden_size)
    out = model.projector(features)
    lm_width = model.language_model.config.hidden_size
    assert out.shape == (3, built.image_tokens.per_image, lm_width)
    assert built.image_tokens.per_image == (5 if proj == "perceiver" else model.vision.num_patches)
    # zero images work too (a text-only batch still runs the projector)
    assert model.projector(features[:0]).shape == (0, built.image_tokens.per_image, lm_width)
    loss = model(**_batch(built)).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_perceiver_position_table_is_fixed(tiny_args):
    model = build_model(tiny_args(vis_proj="perceiver")).model
    names = {n for n, _ in model.projector.named_parameters()}
    assert not any("position" in n for n in names)
    assert "key_positions" in dict(model.projector.named_buffers())


def test_gradient_reaches_exactly_the_trainable_set(tiny_args):
    built = build_model(tiny_args(lang_lora_dim=4, vis_lora_dim=2))
    model = built.model
    model(**_batch(built)).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} trains but got no gradient"
            # LoRA's A matrices get exactly zero gradient at init (B starts at 0); all else moves.
            if ".lora_A." not in name:
                assert param.grad.abs().sum() > 0, f"{name} trains but its gradient is zero"
        else:
            assert param.grad is None, f"{name} is frozen but got a gradient"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("projector.") for n in trainable)
    assert any(".lora_" in n and n.startswith("language_model.") for n in trainable)
    assert any(".lora_" in n and n.startswith("vision_encoder.") for n in trainable)
    assert {n for n in trainable if "embed" in n} == {"language_model.model.embed_tokens.new_rows"}


def test_image_k_lands_on_placeholder_k(tiny_args):
    """Three images in one sample: span k holds projector(features of image k), in order."""
    built = build_model(tiny_args())
    model = built.model
    it = built.image_tokens
    ids = torch.tensor([[3] + it.span() + [5] + it.span() + [6] + it.span() + [7]])
    features = torch.stack([torch.full((model.vision.num_patches, model.vision.hidden_size), float(k)) for k in range(3)])
    features = features + 0.01 * torch.randn_like(features)
    with torch.no_grad():
        embeds = model.embed(ids, features)
        expected = model.projector(features)
    positions = (ids[0] == it.image_id).nonzero()[:, 0].reshape(3, it.per_image)
    for k in range(3):
        torch.testing.assert_close(embeds[0, positions[k]], expected[k])
        for other in set(range(3)) - {k}:
            assert not torch.allclose(embeds[0, positions[k]], expected[other])


def test_span_count_mismatch_is_an_error(tiny_args):
    built = build_model(tiny_args())
    batch = _batch(built, n_images_per_row=(1, 1))
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(ValueError, match="<image> token positions"):
        built.model(**batch)


def test_text_only_batch_still_touches_the_projector(tiny_args):
    built = build_model(tiny_args())
    batch = _batch(built, n_images_per_row=(0, 0))
    batch["pixel_values"] = batch["pixel_values"][:0]
    built.model(**batch).loss.backward()
    assert all(p.grad is not None for p in built.model.projector.parameters())


def test_only_new_token_rows_train_by_default_and_full_table_on_request(tiny_args):
    default = count_parameters(build_model(tiny_args()).model)
    by_name = {c.name: c for c in default}
    assert by_name["new token embeddings"].trainable == 3 * 128
    assert by_name["LM input embeddings"].trainable == 0
    full = {c.name: c for c in count_parameters(build_model(tiny_args(train_full_embeddings=True)).model)}
    assert full["LM input embeddings"].trainable == full["LM input embeddings"].total > 0


def test_new_token_rows_change_only_new_ids(tiny_args):
    built = build_model(tiny_args())
    emb = built.model.language_model.get_input_embeddings()
    old_ids = torch.arange(0, built.image_tokens.original_vocab_size)
    before = emb(old_ids).clone()
    with torch.no_grad():
        emb.new_rows.add_(1.0)
    torch.testing.assert_close(emb(old_ids), before, rtol=0, atol=0)
    new = torch.tensor([built.image_tokens.start_id])
    torch.testing.assert_close(emb(new)[0], emb.new_rows[0])


def test_vision_encoder_is_cut_at_the_layer_read(tiny_args):
    full_layers = 3
    model = build_model(tiny_args(vision_feature_layer=-2)).model
    assert model.vision.tower.config.num_hidden_layers == full_layers - 1
    model = build_model(tiny_args(vision_feature_layer=-1)).model
    assert model.vision.tower.config.num_hidden_layers == full_layers


def test_cls_token_dropped_unless_kept(tiny_args):
    drop = build_model(tiny_args()).model.vision
    keep = build_model(tiny_args(vision_keep_cls=True)).model.vision
    assert keep.num_patches == drop.num_patches + 1
    pixels = torch.randn(1, 3, drop.image_size, drop.image_size)
    assert drop(pixels).shape[1] == drop.num_patches
    assert keep(pixels).shape[1] == keep.num_patches


def test_text_only_batch_with_vision_lora_runs_the_encoder_on_a_blank_image(tiny_args):
    built = build_model(tiny_args(vis_lora_dim=2))
    batch = _batch(built, n_images_per_row=(0, 0))
    batch["pixel_values"] = batch["pixel_values"][:0]
    out = built.model(**batch)
    out.loss.backward()
    lora = [p for n, p in built.model.named_parameters() if n.startswith("vision_encoder.") and ".lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() == 0 for p in lora)


def test_loss_from_collated_label_positions_equals_loss_from_labels(tiny_args):
    """The collator's CPU-side ``label_positions`` pick exactly the targets ``labels`` set."""
    from mmtrain.data.collator import label_positions
    from mmtrain.model.vlm import causal_lm_loss

    built = build_model(tiny_args())
    batch = _batch(built, n_images_per_row=(1, 2, 0))
    batch["labels"][2, :4] = batch["input_ids"][2, :4]  # a row labelled at its start, before its padding
    positions = label_positions(batch["labels"])
    targets = batch["labels"][:, 1:]
    assert positions.tolist() == [i for i, t in enumerate(targets.flatten().tolist()) if t != IGNORE_INDEX]
    with torch.no_grad():
        hidden = built.model.language_model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    head = built.model.language_model.get_output_embeddings()
    given = causal_lm_loss(hidden, batch["labels"], head, positions)
    derived = causal_lm_loss(hidden, batch["labels"], head)
    # By hand: every (row, col) target predicted from hidden[row, col], the plain shifted loss.
    logits = head(hidden[:, :-1]).float()
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    keep = targets != IGNORE_INDEX
    for a, b in zip(given, derived):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(given[0], by_hand[keep].mean())
    torch.testing.assert_close(given[2], (by_hand * keep).sum(1))
    assert given[3].tolist() == keep.sum(1).tolist() and int(given[1]) == int(keep.sum())


@pytest.mark.parametrize("mmca", [False, True])
def test_right_padded_batches_drop_the_padding_mask_with_the_same_loss(tiny_args, mmca):
    """The collator's ``right_padded``: no padding mask, causal attention only; the same loss and gradients."""
    from mmtrain.data import Collator
    from tests.adapters import randomise_lora

    built = build_model(tiny_args(lang_lora_dim=4, enable_mmca_attention=mmca))
    model = built.model
    randomise_lora(model)
    batch = Collator(built.tokenizer.pad_token_id)(
        [
            {"input_ids": row[row != built.tokenizer.pad_token_id], "labels": lab[row != built.tokenizer.pad_token_id],
             "pixel_values": pix}
            for row, lab, pix in zip(*(_batch(built, n_images_per_row=(1, 0, 2), text=(5, 7, 9, 4, 6))[k] for k in ("input_ids", "labels")),
                                     (torch.randn(n, 3, model.vision.image_size, model.vision.image_size) for n in (1, 0, 2)))
        ]
    )
    assert batch["right_padded"] is True and bool((batch["attention_mask"] == 0).any()), "the batch must hold padding"
    results = []
    for right_padded in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(**{**batch, "right_padded": right_padded})
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.loss_sum_per_sample, grads))
    (loss_a, per_a, grads_a), (loss_b, per_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_b, per_a, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
