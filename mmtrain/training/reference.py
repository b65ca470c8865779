"""The reference policy of preference tuning: the model as it was when training started, run by the same forward.

No second model is built. The frozen base is shared, so the reference is the trained
model with

* its LoRA adapters switched off, when they started as a no-op (B = 0, a fresh run):
  peft's own switch (``BaseTunerLayer.enable_adapters``, what ``PeftModel.disable_adapter``
  does for a wrapped model; the fused LoRA forward steps aside for disabled layers);
* every other trained tensor (the projector, the new rows, LoRA loaded with
  ``--init_from``, the LM's own weights under ``--lm_training full`` or ``last_layers``,
  whose copies are then a frozen copy of them) pointed at a copy of its starting values, and back, around the
  reference's forward. The swap exchanges storage (``Parameter.data``), so it copies
  nothing per batch however large the trained tensors are (a rank-128 LoRA loaded with
  ``--init_from`` is ~0.3 GB at 7B); the parameter objects the optimizer and DeepSpeed's
  flat buffers hold stay the same, and get their own storage back unchanged.

The copies are taken before a resumed checkpoint loads, so a resumed run has the same
reference as the run it continues, without storing it in the checkpoint. The reference's
forward runs under ``no_grad``, before the policy's forward of the same batch.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from mmtrain.model.lora import is_lora_parameter

logger = logging.getLogger("mmtrain")


class ReferencePolicy:
    """Switches a model to its starting weights for the duration of :meth:`active` (see the module docstring)."""

    def __init__(self, model):
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        lora = [p for name, p in trained if is_lora_parameter(name)]
        fresh = bool(lora) and all(float(p.detach().abs().max()) == 0.0 for name, p in trained if is_lora_parameter(name) and "lora_B" in name)
        self.adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if fresh else []
        kept = [(name, p) for name, p in trained if not (fresh and is_lora_parameter(name))]
        self.params = [p for _, p in kept]
        self.initial = [p.detach().clone() for p in self.params]
        copied = sum(p.numel() for p in self.params)
        size = sum(p.numel() * p.element_size() for p in self.params) / 2**30
        lm = [name for name, _ in kept if name.startswith("language_model.") and not is_lora_parameter(name)]
        how = [f"{len(self.adapters)} LoRA layers switched off"] if self.adapters else []
        if self.params:
            copy = f"{len(self.params)} trained tensors ({copied:,} values, {size:.2f} GiB) swapped for their starting copies"
            how.append(copy + (f", a frozen copy of the {len(lm)} LM tensors that train" if lm else ""))
        logger.info(f"DPO reference: the starting model, {' and '.join(how) or 'nothing trains'}")

    @contextlib.contextmanager
    def active(self):
        """The model computes the reference policy inside (under ``no_grad``), the trained one again on leaving."""
        with torch.no_grad():
            current = [p.data for p in self.params]
            for p, start in zip(self.params, self.initial):
                p.data = start
            for layer in self.adapters:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in self.adapters:
                    layer.enable_adapters(True)
                for p, now in zip(self.params, current):
                    p.data = now


def check_reference_supported(accelerator, train_args) -> None:
    """What the reference's swap cannot do yet, refused before any weights load: ZeRO-3 (partitioned tensors).

    Compiled layers are refused with the flags (``--torch_compile true``); ``auto`` leaves them off under DPO.
    """
    from mmtrain.args import ConfigError
    from mmtrain.training import distributed

    if train_args.objective != "dpo":
        return
    if distributed.zero_stage(accelerator) == 3:
        raise ConfigError(
            "--objective dpo is not supported at ZeRO-3 yet (its reference swaps whole trained tensors, which ZeRO-3 "
            "partitions); use a ZeRO 0-2 config with --config_file"
        )
