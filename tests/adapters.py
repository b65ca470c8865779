"""Test helpers for LoRA adapters."""

import torch


def randomise_lora(model, seed=1):
    """Give every LoRA B matrix small seeded values, so adapters stop being a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
