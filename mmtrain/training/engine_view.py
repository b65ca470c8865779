"""What the DeepSpeed engine sees of the model: the one place that keeps the frozen vision encoder out.

``accelerator.prepare`` (and so DeepSpeed) gets an :class:`EngineView` instead of the
model. It registers the projector and the language model, and the vision encoder only
when it trains (vision LoRA). A frozen encoder is therefore never wrapped, partitioned
by ZeRO-3, hooked or given optimizer state: it runs under ``no_grad`` on every rank that
has images and is skipped by a rank that has none, so ranks never wait on each other
for it. The model itself (``view.vlm``) registers every part, so generic module
operations (``.to()``, ``.eval()``, ``state_dict()``) on it see the whole model.

Parameter names inside the engine are the model's own (``projector.``,
``language_model.``, ``vision_encoder.``), so checkpoints name tensors as the model does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmtrain.model.vlm import VisionLanguageModel


class EngineView(nn.Module):
    def __init__(self, vlm: VisionLanguageModel):
        super().__init__()
        self.projector = vlm.projector
        self.language_model = vlm.language_model
        if vlm.vision_trainable:
            self.vision_encoder = vlm.vision_encoder
        # Held as a plain attribute, not a submodule: registering it would put the frozen
        # encoder back into the engine.
        object.__setattr__(self, "vlm", vlm)

    def forward(self, *args, **kwargs):
        return self.vlm(*args, **kwargs)

    def outside(self) -> dict[str, nn.Module]:
        """The parts of the model the engine does not hold, by their name in the model."""
        return {} if self.vlm.vision_trainable else {"vision_encoder": self.vlm.vision_encoder}

    def place_outside(self, device: torch.device, dtype: torch.dtype) -> None:
        """The engine places what it holds; the parts outside it are placed here."""
        for module in self.outside().values():
            module.to(device=device, dtype=dtype)

    def full_state_dict(self, engine_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole model's tensors: the engine's (gathered at ZeRO-3) and those of the parts outside it."""
        state = dict(engine_state)
        for prefix, module in self.outside().items():
            state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
        return state


@dataclass(frozen=True)
class Prepared:
    """The Accelerator and what ``accelerator.prepare`` returned for training: the engine (an
    :class:`EngineView`, wrapped), its optimizer and its schedule (None where a user needs none)."""

    accelerator: Any
    model: nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None


def unwrap_vlm(accelerator, model) -> VisionLanguageModel:
    """The whole model behind a prepared (wrapped) engine view."""
    return accelerator.unwrap_model(model).vlm
