"""Speed features against the plain path: vision feature cache, LoRA casts, selective checkpointing, compilation."""

from __future__ import annotations

import pytest
import torch

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.data import Collator
from mmtrain.data.template import IGNORE_INDEX
from mmtrain.model import build_model
from mmtrain.model.decoder_layers import checkpoint_first_layers, compile_decoder_layers, decoder_layers
from mmtrain.model.lora import lora_inputs_follow_autocast
from mmtrain.model.vision_cache import IMAGE_KEYS, ImageKeyCollator, VisionFeatureCache
from tests.adapters import randomise_lora


def _items(built, n, seed=0, images=(1, 0, 2)):
    gen = torch.Generator().manual_seed(seed)
    it = built.image_tokens
    size = built.model.vision.image_size
    items = []
    for i in range(n):
        k = images[i % len(images)]
        ids = [1]
        for _ in range(k):
            ids += it.span() + [11]
        answer = torch.randint(20, 200, (4 + i % 5,), generator=gen).tolist()
        items.append(
            {
                "input_ids": torch.tensor(ids + answer),
                "labels": torch.tensor([IGNORE_INDEX] * len(ids) + answer),
                "pixel_values": torch.randn(k, 3, size, size, generator=gen),
            }
        )
    return items


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same_grads(a, b, **tol):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


# ----- frozen vision feature cache ------------------------------------------------------


class _EncoderCalls:
    """Counts the images the vision encoder is run on."""

    def __init__(self, vision):
        self.images = 0
        vision.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.images += inputs[0].shape[0]


def _train(tiny_args, cache_dir=None, *, use_cache: bool, epochs=2):
    torch.manual_seed(0)
    built = build_model(tiny_args(lang_lora_dim=4))
    model = built.model
    calls = _EncoderCalls(model.vision)
    items = _items(built, 6)
    collate = Collator(built.tokenizer.pad_token_id)
    if use_cache:
        collate = ImageKeyCollator(collate)
        cache = VisionFeatureCache(model.encode_images, directory=cache_dir, identity={"test": 1})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, len(items), 3):
            batch = collate([items[i] for i in order[start : start + 3]])
            if use_cache:
                assert len(batch[IMAGE_KEYS]) == batch["pixel_values"].shape[0]
                batch = cache.apply(batch)
                assert "pixel_values" not in batch and IMAGE_KEYS not in batch
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    n_images = sum(item["pixel_values"].shape[0] for item in items)
    return losses, calls.images, n_images, (cache if use_cache else None)


def test_vision_cache_same_losses_over_two_epochs_and_one_encoding_per_image(tiny_args):
    plain, plain_calls, n_images, _ = _train(tiny_args, use_cache=False)
    cached, cached_calls, _, cache = _train(tiny_args, use_cache=True)
    assert plain_calls == 2 * n_images  # the plain path encodes every image every epoch
    assert cached_calls == n_images  # the cache: once per image
    assert len(cache) == n_images and cache.hits == n_images and cache.misses == n_images
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=0, atol=0)


def test_vision_cache_on_disk_is_reused_by_a_new_run(tiny_args, tmp_path):
    first, calls, n_images, _ = _train(tiny_args, tmp_path, use_cache=True, epochs=1)
    assert calls == n_images
    again, calls, _, cache = _train(tiny_args, tmp_path, use_cache=True, epochs=1)
    assert calls == 0 and cache.hits == n_images
    assert again == first


def test_vision_cache_handles_text_only_batches_and_repeated_images(tiny_args):
    built = build_model(tiny_args())
    model = built.model
    calls = _EncoderCalls(model.vision)
    cache = VisionFeatureCache(model.encode_images)
    empty = cache.features(torch.zeros(0, 3, model.vision.image_size, model.vision.image_size))
    assert empty.shape == (0, model.vision.num_patches, model.vision.hidden_size)
    image = torch.randn(1, 3, model.vision.image_size, model.vision.image_size)
    twice = cache.features(torch.cat([image, image]))
    assert calls.images == 1 and torch.equal(twice[0], twice[1])
    torch.testing.assert_close(twice[:1], model.encode_images(image), rtol=0, atol=0)


def test_vision_cache_refuses_a_trained_encoder(model_folders):
    with pytest.raises(ConfigError, match="--cache_vision_features"):
        ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], cache_vision_features=True, vis_lora_dim=2)
    with pytest.raises(ConfigError, match="--vision_cache_dir"):
        ModelArguments(vision_cache_dir="features")


# ----- LoRA in the autocast dtype ------------------------------------------------------


def _lora_inputs(model):
    """Records the dtype of every input to a LoRA A matrix."""
    seen = []
    for name, sub in model.named_modules():
        if name.endswith("lora_A.default"):
            sub.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].dtype))
    return seen


def test_lora_under_autocast_skips_the_fp32_round_trip_with_identical_numbers(tiny_args):
    """Plain mixed precision: frozen base in bf16, LoRA in fp32, autocast to bf16 (CPU autocast here)."""
    items = _items(build_model(tiny_args()), 3)
    results = []
    for follow in (False, True):
        torch.manual_seed(0)  # same projector, new-token rows and LoRA A in both builds
        built = build_model(tiny_args(lang_lora_dim=4), dtype=torch.bfloat16, trainable_dtype=torch.float32)
        model = built.model
        randomise_lora(model)
        if follow:
            assert lora_inputs_follow_autocast(model) > 0
        seen = _lora_inputs(model)
        batch = Collator(built.tokenizer.pad_token_id)(items)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach(), _grads(model), set(seen)))
        # Outside autocast (generation) the cast is still there: an fp32 adapter takes a bf16 input.
        with torch.no_grad():
            assert torch.isfinite(model(**batch).loss)
    (loss_a, grads_a, seen_a), (loss_b, grads_b, seen_b) = results
    assert seen_a == {torch.float32} and seen_b == {torch.bfloat16}
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    _assert_same_grads(grads_a, grads_b, rtol=0, atol=0)


# ----- selective activation checkpointing ----------------------------------------------


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), _grads(model)


def test_checkpointing_first_layers_recomputes_only_them_with_the_same_loss_and_grads(tiny_args):
    built = build_model(tiny_args(lang_lora_dim=4))
    model = built.model
    randomise_lora(model)
    model.train()
    batch = Collator(built.tokenizer.pad_token_id)(_items(built, 3))
    loss_plain, grads_plain = _loss_and_grads(model, batch)

    layers = decoder_layers(model.language_model)
    runs = [0] * len(layers)
    for i, layer in enumerate(layers):
        # Hooks on the layer itself sit outside the checkpoint; its MLP runs again when recomputed.
        layer.mlp.register_forward_pre_hook(lambda m, a, k=i: runs.__setitem__(k, runs[k] + 1))
    assert checkpoint_first_layers(model.language_model, 2) == [0, 1]
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    assert runs[:2] == [2, 2] and runs[2:] == [1] * (len(layers) - 2)  # recomputed in backward: layers 0, 1 only
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    _assert_same_grads(grads_plain, grads_ckpt, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match=f"^gradient_checkpointing_layers {len(layers) + 1}: the language model has {len(layers)} decoder layers"):
        checkpoint_first_layers(model.language_model, len(layers) + 1)


# ----- regional compilation --------------------------------------------------------------


def _compile_works() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2))
    except Exception as err:  # no C++ compiler, unsupported platform
        return f"torch.compile does not run here: {type(err).__name__}: {err}"
    return None


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_compiled_decoder_layers_give_the_eager_loss_and_grads(tiny_args):
    built = build_model(tiny_args(lang_lora_dim=4))
    model = built.model
    randomise_lora(model)
    batch = Collator(built.tokenizer.pad_token_id)(_items(built, 3))
    loss_eager, grads_eager = _loss_and_grads(model, batch)
    names = [n for n, _ in model.named_parameters()]
    assert compile_decoder_layers(model.language_model) == len(decoder_layers(model.language_model))
    assert [n for n, _ in model.named_parameters()] == names  # compiled in place: checkpoints keep their keys
    loss_compiled, grads_compiled = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads_eager, grads_compiled, rtol=1e-4, atol=1e-5)


def assert_change_keeps_loss_and_grads(tiny_args, change, *, loss_tol=1e-5, grad_atol=1e-5, **model_kwargs):
    """A tiny model's loss and trainable gradients on one batch are the same after ``change(model)``."""
    built = build_model(tiny_args(**{"lang_lora_dim": 4, **model_kwargs}))
    model = built.model
    randomise_lora(model)
    batch = Collator(built.tokenizer.pad_token_id)(_items(built, 3))
    loss_ref, grads_ref = _loss_and_grads(model, batch)
    change(model)
    loss, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=loss_tol)
    _assert_same_grads(grads_ref, grads, rtol=1e-4, atol=grad_atol)


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_compiled_layers_with_mmca_give_the_eager_loss_and_grads(tiny_args):
    """MMCA inside compiled decoder layers (its plan reads counts back: a graph break) keeps the eager numbers."""
    assert_change_keeps_loss_and_grads(tiny_args, lambda model: compile_decoder_layers(model.language_model), enable_mmca_attention=True)


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_compiled_mmca_layers_take_batches_of_new_lengths(tiny_args):
    """Batches of four lengths through compiled MMCA layers, each giving the eager loss.

    From the second new shape on, torch.compile traces with symbolic sizes; MMCA's plan,
    whose sizes come from counting tokens, once made it build a guard on a size with no
    source (``IndexError`` / "sources must not be empty") at the first batch of a new
    length, which a one-shape test never saw.
    """
    built = build_model(tiny_args(lang_lora_dim=4, enable_mmca_attention=True))
    model = built.model
    randomise_lora(model)
    collate = Collator(built.tokenizer.pad_token_id)
    batches = [collate(_items(built, 3, seed=s, images=images)) for s, images in enumerate([(1, 0, 2), (0, 1, 0), (3, 0, 1), (0, 0, 0)])]
    assert len({b["input_ids"].shape[1] for b in batches}) == 4
    eager = [_loss_and_grads(model, b)[0] for b in batches]
    compile_decoder_layers(model.language_model)
    for batch, expected in zip(batches, eager):
        loss, _ = _loss_and_grads(model, batch)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
