"""What the model holds: parameters per component, and what they cost in memory.

The start-up log, ``python -m mmtrain.budget`` and ``mmtrain.memory`` all count with
these functions, from the very model object training builds (or its meta-device twin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.model.fp8 import FLOAT8, Float8FrozenLinear
from mmtrain.model.lora import is_lora_parameter
from mmtrain.model.nf4 import BITS_PER_WEIGHT, NF4FrozenLinear
from mmtrain.model.vlm import VisionLanguageModel

COMPONENTS = (
    "vision encoder",
    "vision LoRA",
    "projector",
    "LM input embeddings",
    "new token embeddings",
    "language model",
    "LM LoRA",
)


def component_of(name: str) -> str:
    if name.startswith("vision_encoder."):
        return "vision LoRA" if is_lora_parameter(name) else "vision encoder"
    if name.startswith("projector."):
        return "projector"
    if is_lora_parameter(name):
        return "LM LoRA"
    if name.endswith(".new_rows"):
        return "new token embeddings"
    # NewTokenEmbedding's frozen table is `<the LM's table name>.base.weight` (embed_tokens, embed_in, word_embeddings, ...)
    if "embed_tokens" in name or name.endswith(("wte.weight", ".base.weight")):
        return "LM input embeddings"
    return "language model"


def numel(param: nn.Parameter) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter."""
    return deepspeed_compat.full_numel(param)


@dataclass
class ComponentCount:
    name: str
    total: int = 0
    trainable: int = 0
    float8: int = 0  # frozen weights held in float8 (--fp8_base, --fp8_vision): one byte each
    float8_scales: int = 0  # their fp32 scales, one per output channel (buffers, not parameters)
    nf4: int = 0  # frozen weights held in 4-bit NF4 (--quantize_base, --quantize_vision): 4.127 bits each, scales included

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def count_parameters(model: VisionLanguageModel) -> list[ComponentCount]:
    """Parameters per component (see ``COMPONENTS``), total and trainable."""
    counts = {name: ComponentCount(name) for name in COMPONENTS}
    # An NF4 layer's parameter holds two codes a byte: counted as the weights it stands for.
    nf4 = {id(m.weight): m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4FrozenLinear)}
    for name, param in model.named_parameters():
        c = counts[component_of(name)]
        n = nf4.get(id(param)) or numel(param)
        if id(param) in nf4:
            c.nf4 += n
        c.total += n
        if param.requires_grad:
            c.trainable += n
        if param.dtype == FLOAT8:
            c.float8 += n
    for name, module in model.named_modules():
        if isinstance(module, Float8FrozenLinear):
            counts[component_of(name + ".weight")].float8_scales += module.out_features
    return list(counts.values())


BYTES_PER_PARAM = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class ComponentBudget:
    name: str
    total: int
    trainable: int
    frozen: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int


def budget_from_counts(counts: list[ComponentCount], precision: str = "bf16") -> list[ComponentBudget]:
    width = BYTES_PER_PARAM[precision]
    optimizer_per_param = 8 if precision == "fp32" else 12
    rows = [
        ComponentBudget(
            name=c.name,
            total=c.total,
            trainable=c.trainable,
            frozen=c.frozen,
            weight_bytes=(c.total - c.float8 - c.nf4) * width + c.float8 + 4 * c.float8_scales + _nf4_bytes(c.nf4),
            gradient_bytes=c.trainable * width,
            optimizer_bytes=c.trainable * optimizer_per_param,
        )
        for c in counts
    ]
    total = ComponentBudget("total", *[sum(getattr(r, f) for r in rows) for f in ("total", "trainable", "frozen", "weight_bytes", "gradient_bytes", "optimizer_bytes")])
    return rows + [total]


def _nf4_bytes(weights: int) -> int:
    """Bytes of ``weights`` NF4 weights with their double-quantised block scales (mmtrain/model/nf4.py)."""
    return math.ceil(weights * BITS_PER_WEIGHT / 8)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= 1000
    return f"{n:.3g}T{unit}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**24 else f"{n / 2**20:.2f} MiB"


def format_table(rows: list[ComponentBudget]) -> str:
    header = f"{'component':<22}{'total':>10}{'trainable':>11}{'frozen':>10}{'weights':>13}{'grads':>13}{'optimizer':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.name == "total":
            lines.append("-" * len(header))
        lines.append(
            f"{r.name:<22}{_human(r.total):>10}{_human(r.trainable):>11}{_human(r.frozen):>10}"
            f"{_gib(r.weight_bytes):>13}{_gib(r.gradient_bytes):>13}{_gib(r.optimizer_bytes):>13}"
        )
    total = rows[-1]
    share = 100.0 * total.trainable / max(total.total, 1)
    lines.append(f"trainable: {total.trainable:,} of {total.total:,} parameters ({share:.3f}%)")
    return "\n".join(lines)
