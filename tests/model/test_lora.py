"""LoRA through peft: scoping, gradients with checkpointing, fusing into a copy."""

import pytest
import torch

from mmtrain.args import ConfigError
from mmtrain.model import build_model
from mmtrain.model.lora import lora_scalings, merge_lora_state_dict


def _images_batch(built, n=2):
    it = built.image_tokens
    ids = torch.tensor([[3] + it.span() + [5, 6, 7, 8]] * n)
    labels = ids.clone()
    labels[:, : -4] = -100
    size = built.model.vision.image_size
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=torch.randn(n, 3, size, size))


def test_scope_selects_linear_layers_by_name(tiny_args):
    built = build_model(tiny_args(lang_lora_dim=4, lang_lora_module_name="self_attn.", vis_lora_dim=2))
    lm_targets = built.lora_targets["language_model"]
    assert lm_targets and all("self_attn." in t for t in lm_targets)
    assert not any("mlp" in t for t in lm_targets)
    # the vision tower is cut at the layer read (-2 of 3): adapters on its 2 remaining layers only
    vis_targets = built.lora_targets["vision_encoder"]
    assert {t.split("layers.")[1].split(".")[0] for t in vis_targets} == {"0", "1"}


def test_scope_matching_nothing_fails_naming_the_field(tiny_args):
    with pytest.raises(ConfigError, match=r"^vis_lora_module_name 'nowhere\.' matches no Linear layer"):
        build_model(tiny_args(vis_lora_dim=2, vis_lora_module_name="nowhere."))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vision_lora_gets_gradients(tiny_args, checkpointing):
    built = build_model(tiny_args(vis_lora_dim=4, lang_lora_dim=4))
    model = built.model
    if checkpointing:
        from mmtrain.model.decoder_layers import enable_checkpointing

        enable_checkpointing(model.language_model)  # as the builder does, whichever name transformers gives the switch
        enable_checkpointing(model.vision.tower)
        model.train()
    # one optimizer step so B != 0 and A's gradient is non-zero too
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**_images_batch(built)).loss.backward()
    opt.step()
    opt.zero_grad()
    model(**_images_batch(built)).loss.backward()
    vision_lora = [(n, p) for n, p in model.named_parameters() if n.startswith("vision_encoder.") and ".lora_" in n]
    assert vision_lora
    for name, p in vision_lora:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_alpha_sets_the_scale(tiny_args):
    built = build_model(tiny_args(lang_lora_dim=4, lang_lora_alpha=16))
    assert set(lora_scalings(built.model).values()) == {4.0}
    built = build_model(tiny_args(lang_lora_dim=4))
    assert set(lora_scalings(built.model).values()) == {2.0}  # default alpha = 2 x rank, LLaVA's LoRA scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_into_a_copy_leaves_training_weights_bit_identical(tiny_args, dtype):
    built = build_model(tiny_args(lang_lora_dim=4, vis_lora_dim=4), dtype=dtype)
    model = built.model
    with torch.no_grad():  # non-trivial adapters
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora_state_dict(model.state_dict(), lora_scalings(model))
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"
    # merged weight = W + scale * B @ A (in fp32, rounded once)
    layer = "language_model.model.layers.0.self_attn.q_proj"
    w = before[f"{layer}.base_layer.weight"].float()
    a = before[f"{layer}.lora_A.default.weight"].float()
    b = before[f"{layer}.lora_B.default.weight"].float()
    scale = lora_scalings(model)[layer]
    torch.testing.assert_close(merged[f"{layer}.weight"], (w + scale * (b @ a)).to(dtype), rtol=0, atol=0)
    assert not any(".lora_" in k or ".base_layer." in k for k in merged)


def test_fused_weights_compute_what_the_adapted_model_computes(tiny_args):
    """A plain model loaded with the fused weights gives the adapted model's outputs."""
    built = build_model(tiny_args(lang_lora_dim=4))
    model = built.model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    batch = _images_batch(built)
    with torch.no_grad():
        adapted = model(**batch, return_logits=True).logits
    merged = merge_lora_state_dict(model.state_dict(), lora_scalings(model))
    plain = build_model(tiny_args()).model
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        fused = plain(**batch, return_logits=True).logits
    # fp32 rounding of (W + s·B·A)·x against W·x + s·B·(A·x): ~1e-4 of the logits' scale; a wrong merge is off by O(1)
    torch.testing.assert_close(fused, adapted, rtol=1e-4, atol=1e-3 * float(adapted.abs().max()))
