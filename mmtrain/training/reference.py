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

At ZeRO-3 a trained tensor is partitioned: each process holds a share
(:func:`mmtrain.compat.deepspeed.partition`) and every forward gathers the whole from the
shares. The swap then exchanges each process's share for its starting share, and the
engine's gathered weights are released before and after the reference's forward
(:func:`mmtrain.compat.deepspeed.release_gathered`), so that its forward gathers the
starting values and the policy's forward the trained ones again. Each process keeps only
its share of the starting copies. The cost: no weight stays gathered from one pass into
the next (ZeRO-3's small persistent weights are gathered again for each forward); with
only fresh LoRA trained there is nothing to swap and nothing is released. Refused at ZeRO-3 (:func:`check_reference_supported`):
secondary partitions (``zero_hpz_partition_size`` > 1, ZeRO++), which the backward
gathers from instead and which a reference forward would fill with starting values, and
parameters offloaded to NVMe, whose shares are swapped out to disk.

The copies are taken before a resumed checkpoint loads, so a resumed run has the same
reference as the run it continues, without storing it in the checkpoint. The reference's
forward runs under ``no_grad``, before the policy's forward of the same batch.
With ``--precompute_ref`` the reference's log-probabilities are computed once, before
training (:mod:`mmtrain.training.reference_table`), and the copies are freed
(:meth:`ReferencePolicy.free`).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.model.lora import is_lora_parameter

logger = logging.getLogger("mmtrain")


class ReferencePolicy:
    """Switches a model to its starting weights for the duration of :meth:`active` (see the module docstring).

    ``engine``: the prepared model that runs the forwards, needed at ZeRO-3 to release its
    gathered weights around the reference's forward.
    """

    def __init__(self, model, engine=None):
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        lora_b = [p for name, p in trained if is_lora_parameter(name) and "lora_B" in name]
        fresh = bool(lora_b) and _all_zero(lora_b)
        self.adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if fresh else []
        kept = [(name, p) for name, p in trained if not (fresh and is_lora_parameter(name))]
        self.params = [p for _, p in kept]
        holders = [_holder(p) for p in self.params]
        self.initial = [h.detach().clone() for h in holders]
        partitioned = any(h is not p for h, p in zip(holders, self.params))
        self.engine = engine if partitioned else None
        if partitioned and engine is None:
            raise ValueError("a ZeRO-3 model's reference needs the engine that runs it (to release its gathered weights)")
        self.freed = False
        copied = sum(deepspeed_compat.full_numel(p) for p in self.params)
        size = sum(h.numel() * h.element_size() for h in self.initial) / 2**30
        lm = [name for name, _ in kept if name.startswith("language_model.") and not is_lora_parameter(name)]
        how = [f"{len(self.adapters)} LoRA layers switched off"] if self.adapters else []
        if self.params:
            held = f"{size:.2f} GiB, this process's ZeRO-3 shares" if partitioned else f"{size:.2f} GiB"
            copy = f"{len(self.params)} trained tensors ({copied:,} values, {held}) swapped for their starting copies"
            how.append(copy + (f", a frozen copy of the {len(lm)} LM tensors that train" if lm else ""))
        logger.info(f"DPO reference: the starting model, {' and '.join(how) or 'nothing trains'}")

    @contextlib.contextmanager
    def active(self):
        """The model computes the reference policy inside (under ``no_grad``), the trained one again on leaving."""
        if self.freed:
            raise RuntimeError("the DPO reference's starting copies were freed (--precompute_ref); its log-probabilities come from the table")
        with torch.no_grad():
            self._release()  # weights gathered before hold the trained values
            # looked up each time: a ZeRO-3 checkpoint load may give a parameter another share tensor
            holders = [_holder(p) for p in self.params]
            current = [h.data for h in holders]
            for h, start in zip(holders, self.initial):
                h.data = start
            for layer in self.adapters:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in self.adapters:
                    layer.enable_adapters(True)
                self._release()  # weights gathered (or prefetched) inside hold the starting values
                for h, now in zip(holders, current):
                    h.data = now

    def free(self) -> None:
        """Drop the starting copies (the frozen copy of trained LM weights among them); :meth:`active` refuses from then on."""
        size = sum(h.numel() * h.element_size() for h in self.initial) / 2**30
        self.initial = []
        self.freed = True
        if size:
            logger.info(f"DPO reference: its starting copies freed ({size:.2f} GiB), its log-probabilities precomputed")

    def _release(self) -> None:
        if self.engine is not None:
            deepspeed_compat.release_gathered(self.engine)


def _holder(param: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds ``param``'s values on this process: itself, or its ZeRO-3 share."""
    return deepspeed_compat.partition(param) if deepspeed_compat.is_zero3_partitioned(param) else param


def _all_zero(params: list[torch.Tensor]) -> bool:
    """Whether every value of ``params`` is 0, on every process's share at ZeRO-3 (the same answer everywhere)."""
    largest = torch.zeros((), dtype=torch.float32)
    for p in params:
        values = _holder(p).detach()
        if values.numel():
            largest = torch.maximum(largest, values.abs().max().float().cpu())
    if any(deepspeed_compat.is_zero3_partitioned(p) for p in params) and torch.distributed.is_initialized():
        # NCCL reduces device tensors only (the shares may be offloaded to the host)
        nccl = torch.distributed.get_backend() == "nccl"
        largest = largest.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    return float(largest) == 0.0


def check_reference_supported(accelerator, train_args) -> None:
    """What the reference's swap cannot do, refused before any weights load: ZeRO-3's secondary or NVMe-offloaded partitions."""
    from mmtrain.args import ConfigError
    from mmtrain.training import distributed

    if train_args.objective != "dpo" or distributed.zero_stage(accelerator) != 3:
        return
    zero = distributed.deepspeed_plugin(accelerator).deepspeed_config.get("zero_optimization", {})
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise ConfigError(
            "--objective dpo at ZeRO-3 does not support zero_hpz_partition_size > 1 in the DeepSpeed config of --config_file "
            "(the backward gathers from secondary partitions, which the reference's forward would fill with starting values); "
            "set it to 1"
        )
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        raise ConfigError(
            "--objective dpo at ZeRO-3 does not support offload_param to nvme in the DeepSpeed config of --config_file "
            "(the reference swaps each process's share of the trained weights, which NVMe offload keeps on disk); "
            "offload parameters to cpu or none"
        )
