"""Multi-modal causal attention: the fused path against a slow reference, causality, plumbing, training, generation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache

from mmtrain import presets
from mmtrain.args import ModelArguments
from mmtrain.model import build_model
from mmtrain.model.mmca import (
    IMAGE_MASK_KWARG,
    enable_mmca,
    mmca_attention_forward,
    mmca_self_attention_forward,
    uses_mmca,
)

FORWARDS = {"same_image": mmca_attention_forward, "self": mmca_self_attention_forward}

# Token kinds of the test layouts: t text, s/e <im_start>/<im_end> (text), i image, p left padding.
LAYOUTS = [
    "tttsiiiietsiiiett",  # a system prompt before the first image, two images
    "pppptsiiietttsiie",  # left padding, then two images, the last one at the very end
    "ttttttttttttttttt",  # text only
    "siiiiesiiieesiiet",  # starts with an image, three images, adjacent spans
]


def kinds_to_masks(layouts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    is_image = torch.tensor([[c == "i" for c in s] for s in layouts])
    not_pad = torch.tensor([[c != "p" for c in s] for s in layouts])
    return is_image, not_pad


def reference_mmca(q, k, v, is_image, not_pad, image_attention):
    """MMCA written out token by token in fp64: explicit key sets, one softmax per set."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, length, dim = q.shape
    out = torch.zeros(batch, heads, length, dim, dtype=torch.float64)
    for b in range(batch):
        image_of, current, previous = [], 0, False
        for j in range(length):
            flag = bool(is_image[b, j])
            if flag and not previous:
                current += 1
            image_of.append(current if flag else 0)
            previous = flag
        for i in range(length):
            valid = [j for j in range(i + 1) if not_pad[b, j]]
            if is_image[b, i]:
                if image_attention == "self":
                    groups = [[j for j in valid if j == i]]
                else:
                    groups = [[j for j in valid if image_of[j] == image_of[i]]]
            else:
                groups = [[j for j in valid if not is_image[b, j]], [j for j in valid if is_image[b, j]]]
            for h in range(heads):
                for keys in groups:
                    if not keys:
                        continue
                    scores = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / math.sqrt(dim)
                    weights = torch.softmax(scores, dim=0)
                    out[b, h, i] += sum(w * v[b, h, j] for w, j in zip(weights, keys))
    return out


def fast_mmca(q, k, v, is_image, not_pad, image_attention, groups=1):
    """The registered attention function, fed the boolean causal + padding mask the model builds."""
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None] & not_pad[:, None, None, :]
    module = SimpleNamespace(num_key_value_groups=groups)
    out, _ = FORWARDS[image_attention](module, q, k, v, allowed, scaling=q.shape[-1] ** -0.5, **{IMAGE_MASK_KWARG: is_image})
    return out.transpose(1, 2)


def random_qkv(batch, heads, length, dim, kv_heads=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("image_attention", ["same_image", "self"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_fast_path_matches_reference(image_attention, padded):
    # Without padding the text term takes SDPA's causal kernel; with it, an explicit mask.
    layouts = LAYOUTS if padded else [s for s in LAYOUTS if "p" not in s]
    is_image, not_pad = kinds_to_masks(layouts)
    q, k, v = random_qkv(len(layouts), 4, len(layouts[0]), 8, kv_heads=2)
    expected = reference_mmca(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_image, not_pad, image_attention)
    got = fast_mmca(q, k, v, is_image, not_pad, image_attention, groups=2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    if padded:
        # Rows of left padding have no valid key at all: exactly zero, not NaN, not uniform.
        assert torch.equal(got[1, :, :4], torch.zeros_like(got[1, :, :4]))


def test_system_prompt_ignores_later_images():
    """The text before the first image gets no image term: plain causal attention over text."""
    is_image, not_pad = kinds_to_masks(LAYOUTS[:1])
    q, k, v = random_qkv(1, 2, len(LAYOUTS[0]), 8)
    got = fast_mmca(q, k, v, is_image, not_pad, "same_image")
    causal_text = torch.nn.functional.scaled_dot_product_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], is_causal=True)
    torch.testing.assert_close(got[:, :, :4], causal_text, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("image_attention", ["same_image", "self"])
def test_no_weight_from_future_tokens(image_attention):
    is_image, not_pad = kinds_to_masks(LAYOUTS)
    q, k, v = random_qkv(len(LAYOUTS), 2, len(LAYOUTS[0]), 8, seed=1)
    base = fast_mmca(q, k, v, is_image, not_pad, image_attention)
    for t in range(len(LAYOUTS[0]) - 1):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1 :] += 10 * torch.randn_like(k2[:, :, t + 1 :])
        v2[:, :, t + 1 :] += 10 * torch.randn_like(v2[:, :, t + 1 :])
        moved = fast_mmca(q, k2, v2, is_image, not_pad, image_attention)
        assert torch.equal(moved[:, :, : t + 1], base[:, :, : t + 1]), f"a query at or before {t} saw a later token"


def test_gradients_finite_with_empty_rows():
    is_image, not_pad = kinds_to_masks(LAYOUTS)
    q, k, v = (x.float().requires_grad_() for x in random_qkv(len(LAYOUTS), 2, len(LAYOUTS[0]), 8, seed=2))
    fast_mmca(q, k, v, is_image, not_pad, "same_image").square().sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    # A padded query receives nothing, so it sends no gradient back.
    assert torch.equal(q.grad[1, :, :4], torch.zeros_like(q.grad[1, :, :4]))


# --- in a transformers model -------------------------------------------------------------------


def tiny_lm(name="tiny-llama", image_attention=None, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(presets.preset_config(name), attn_implementation="sdpa", dtype=dtype).eval()
    if image_attention:
        enable_mmca(model, image_attention)
    return model


def random_sequence(layout: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    is_image, not_pad = kinds_to_masks([layout])
    embeds = torch.randn(1, len(layout), 128, generator=g)
    return embeds, is_image, not_pad


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_text_only_equals_plain_causal(name):
    """With no image token MMCA is causal attention; and switching it on changes nothing else."""
    embeds, _, _ = random_sequence(LAYOUTS[2])
    plain = tiny_lm(name)(inputs_embeds=embeds).logits
    mmca_model = tiny_lm(name, "same_image")
    assert uses_mmca(mmca_model)
    torch.testing.assert_close(mmca_model(inputs_embeds=embeds).logits, plain, rtol=1e-5, atol=1e-5)
    image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(mmca_model(inputs_embeds=embeds, mmca_image_mask=image_mask).logits, plain, rtol=1e-5, atol=1e-5)


def test_model_is_causal_end_to_end():
    model = tiny_lm("tiny-qwen2", "same_image")
    embeds, is_image, _ = random_sequence(LAYOUTS[0])
    with torch.no_grad():
        base = model(inputs_embeds=embeds, mmca_image_mask=is_image).logits
        for t in (2, 6, 11):
            moved = embeds.clone()
            moved[:, t + 1 :] = torch.randn_like(moved[:, t + 1 :])
            out = model(inputs_embeds=moved, mmca_image_mask=is_image).logits
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)


def test_padding_and_packing_compose():
    """Left padding and packed documents (position_ids restart) give each sequence its own result."""
    model = tiny_lm("tiny-llama", "same_image")
    a_embeds, a_image, _ = random_sequence("tsiietttsiett", seed=3)
    b_embeds, b_image, _ = random_sequence("ttsiiiett", seed=4)
    with torch.no_grad():
        a = model(inputs_embeds=a_embeds, mmca_image_mask=a_image).logits
        b = model(inputs_embeds=b_embeds, mmca_image_mask=b_image).logits

        pad = a_embeds.shape[1] - b_embeds.shape[1]
        padded_b = torch.cat([torch.zeros(1, pad, 128), b_embeds], dim=1)
        batch = torch.cat([a_embeds, padded_b])
        image_mask = torch.cat([a_image, torch.cat([torch.zeros(1, pad, dtype=torch.bool), b_image], 1)])
        attention_mask = torch.ones(2, a_embeds.shape[1], dtype=torch.long)
        attention_mask[1, :pad] = 0
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        out = model(inputs_embeds=batch, attention_mask=attention_mask, position_ids=position_ids, mmca_image_mask=image_mask).logits
        torch.testing.assert_close(out[0], a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1, pad:], b[0], rtol=1e-5, atol=1e-5)

        packed = torch.cat([a_embeds, b_embeds], dim=1)
        packed_image = torch.cat([a_image, b_image], dim=1)
        position_ids = torch.cat([torch.arange(a_embeds.shape[1]), torch.arange(b_embeds.shape[1])])[None]
        # Packed documents are only recognised without a cache, as in training.
        out = model(inputs_embeds=packed, position_ids=position_ids, mmca_image_mask=packed_image, use_cache=False).logits
        torch.testing.assert_close(out[0, : a.shape[1]], a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0, a.shape[1] :], b[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    embeds, is_image, _ = random_sequence(LAYOUTS[0])
    with torch.no_grad():
        full = tiny_lm("tiny-llama", "same_image")(inputs_embeds=embeds, mmca_image_mask=is_image).logits
        half = tiny_lm("tiny-llama", "same_image", dtype=dtype)(inputs_embeds=embeds.to(dtype), mmca_image_mask=is_image).logits
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("image_attention", ["same_image", "self"])
def test_cached_generation_equals_full_forward(image_attention):
    """Greedy decoding with a KV cache (image mask of the prompt only) equals no-cache forwards."""
    model = tiny_lm("tiny-llama", image_attention)
    embeds, is_image, _ = random_sequence("ttsiiiietsiiet", seed=5)
    table = model.get_input_embeddings()
    steps = 5
    with torch.no_grad():
        no_cache, sequence = [], embeds
        for _ in range(steps):
            logits = model(inputs_embeds=sequence, mmca_image_mask=is_image).logits[:, -1]
            token = logits.argmax(-1)
            no_cache.append(token)
            sequence = torch.cat([sequence, table(token)[:, None]], dim=1)

        cache = DynamicCache(config=model.config)
        out = model(inputs_embeds=embeds, mmca_image_mask=is_image, cache=cache, use_cache=True)
        cached = [out.logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            out = model(inputs_embeds=table(cached[-1])[:, None], mmca_image_mask=is_image, cache=out.cache, use_cache=True)
            cached.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(cached, 1), torch.stack(no_cache, 1))


def test_cached_logits_match_full_forward():
    model = tiny_lm("tiny-qwen2", "same_image")
    embeds, is_image, _ = random_sequence(LAYOUTS[0], seed=6)
    split = 9
    with torch.no_grad():
        full = model(inputs_embeds=embeds, mmca_image_mask=is_image).logits
        first = model(inputs_embeds=embeds[:, :split], mmca_image_mask=is_image[:, :split], use_cache=True)
        rest = model(inputs_embeds=embeds[:, split:], mmca_image_mask=is_image, cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-5, atol=1e-5)


# --- the VLM -----------------------------------------------------------------------------------


def vlm_batch(built, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = built.image_tokens
    vision = built.model.vision
    ids, labels = [], []
    for sample in range(2):
        prompt = torch.randint(3, 200, (4,), generator=g).tolist()
        answer = torch.randint(3, 200, (5,), generator=g).tolist()
        seq = prompt + tokens.span() + prompt[:2] + tokens.span() + answer
        ids.append(seq)
        labels.append([-100] * (len(seq) - len(answer)) + answer)
    pixels = torch.rand(4, 3, vision.image_size, vision.image_size, generator=g)
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(2, len(ids[0]), dtype=torch.long), labels=torch.tensor(labels), pixel_values=pixels)


def seeded_build(**kwargs):
    # The projector and the new-token rows draw from the global generator.
    torch.manual_seed(0)
    return build_model(ModelArguments(lang_lora_dim=4, lang_lora_alpha=4, **kwargs))


def test_flag_off_is_inert():
    off = seeded_build()
    default = seeded_build(enable_mmca_attention=False, mmca_image_attention="self")
    on = seeded_build(enable_mmca_attention=True)
    assert not uses_mmca(off.model.language_model) and uses_mmca(on.model.language_model)
    batch = vlm_batch(off)
    with torch.no_grad():
        loss_off = off.model(**batch).loss
        assert torch.equal(default.model(**batch).loss, loss_off)
        assert not torch.equal(on.model(**batch).loss, loss_off)


def test_vlm_trains_with_mmca_lora_and_checkpointing():
    built = seeded_build(enable_mmca_attention=True)
    model = built.model
    model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.language_model.model.gradient_checkpointing
    model.train()
    seen = []

    def spy(module, *args, **kwargs):
        seen.append(kwargs.get(IMAGE_MASK_KWARG) is not None)
        return mmca_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("mmca", spy)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        batch = vlm_batch(built)
        losses = []
        for step in range(6):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                lora = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
                assert lora and all(g is not None and g.abs().sum() > 0 for g in lora)
            optimizer.step()
            losses.append(loss.item())
    finally:
        AttentionInterface.register("mmca", mmca_attention_forward)
    # Every layer's attention ran in forward and again in the recomputation, always with the image mask.
    assert len(seen) == 2 * model.language_model.config.num_hidden_layers * len(losses) and all(seen)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.5, losses
