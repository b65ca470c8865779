"""The DPO reference (:class:`ReferencePolicy`) against separately built models, on tiny real checkpoints.

Inside ``active()`` the trained model must give the logits of a model built with the
starting weights; on leaving, the logits of the trained one again, from the very same
storage (the optimizer and DeepSpeed hold those tensors).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mmtrain.training.reference import ReferencePolicy
from tests.model.test_vlm import _batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, return_logits=True).logits


def _train_a_little(model):
    """Move every trained tensor (as optimizer steps would), LoRA's B included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("start", ["fresh_lora", "loaded_lora", "projector_only", "vision_lora", "full_lm"])
def test_the_reference_is_the_starting_model_and_leaving_restores_the_trained_one(tiny_args, start):
    from mmtrain.model import build_model

    lora = 0 if start in ("projector_only", "full_lm") else 4
    extra = {"lm_training": "full"} if start == "full_lm" else {}
    built = build_model(tiny_args(lang_lora_dim=lora, vis_lora_dim=4 if start == "vision_lora" else 0, **extra))
    model = built.model.eval()
    torch.manual_seed(0)
    batch = _batch(built)
    if start == "loaded_lora":  # LoRA that starts non-zero (--init_from): swapped, not switched off
        _train_a_little(model)
    starting = copy.deepcopy(model)
    reference = ReferencePolicy(model)
    assert bool(reference.adapters) == (start in ("fresh_lora", "vision_lora"))
    _train_a_little(model)
    trained = copy.deepcopy(model)
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}

    expected_reference, expected_trained = _logits(starting, batch), _logits(trained, batch)
    assert not torch.allclose(expected_reference, expected_trained)  # training moved the model
    with reference.active():
        torch.testing.assert_close(_logits(model, batch), expected_reference, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, batch), expected_trained, rtol=0, atol=0)
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == storage
    for (name, p), (_, q) in zip(model.named_parameters(), trained.named_parameters()):
        assert torch.equal(p, q), name
