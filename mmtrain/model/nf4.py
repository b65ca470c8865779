"""The frozen base in 4 bits (``--quantize_base nf4``, ``--quantize_vision nf4``): QLoRA's NF4.

Each frozen ``nn.Linear`` of the LM's decoder layers (and, with ``--quantize_vision``, of
the vision tower) becomes an :class:`NF4FrozenLinear`: its weight quantised once by
bitsandbytes to NF4 (the 4-bit data type of the QLoRA paper, whose 16 levels are the
quantiles of a normal distribution) in blocks of 64 weights, each block with its own
absolute maximum; with double quantisation those absolute maxima are themselves held in
8 bits, in blocks of 256, with one float32 scale per block. The weight costs half a
byte, plus 8/64 bit for a block's absmax and 32/(64*256) bit for the second level's
scale: 4.127 bits a weight (the QLoRA paper, section 3, "Double Quantization").

Forward and the input gradient go through ``bitsandbytes.matmul_4bit``: the weight is
dequantised to the input's dtype (bfloat16 in GPU training: the compute dtype) for each
product and freed at once, so activations, LoRA, the projector, the embeddings and the
output head stay bfloat16. The weight has no gradient and no optimizer state.

Compilation: the layer traces into one graph with no break (bitsandbytes registers its
4-bit operations with ``torch.library``), so ``--torch_compile`` compiles decoder layers
over NF4 weights as over bfloat16 ones (checked with inductor on a CPU; the GPU tier
compiles it on CUDA). Fused LoRA does not take NF4 layers: its fused product needs a plain
or float8 weight, and bitsandbytes dequantises inside its own; those layers keep peft's
forward, with the same numbers.

Why not transformers' ``BitsAndBytesConfig``: it quantises while ``from_pretrained`` reads
the weights, which presets (random weights drawn from a seed) and the LLaVA import do not
go through, and its ``Params4bit`` lives as the parameter DeepSpeed casts and broadcasts.
Converting the built model's frozen Linears in place, as ``--fp8_base`` does
(:mod:`mmtrain.model.fp8`), gives every way of building the model the same 4-bit layers,
under LoRA layers peft has already wrapped (their ``base_layer`` is converted). The peak
while loading is then the bfloat16 model, one layer at a time being quantised; where that
does not fit, quantising while loading is the switch to add.

Why not peft's ``prepare_model_for_kbit_training``: it casts every non-quantised
parameter to float32 (the projector and LoRA already train in their own dtype here,
chosen by the trainer) and turns on checkpointing through input-gradient hooks (mmtrain's
``--gradient_checkpointing`` already wraps the decoder layers). Neither is needed.

Exports hold full-precision merged weights, as QLoRA users expect. ``state_dict()`` of an
:class:`NF4FrozenLinear` writes ``weight`` dequantised (``bitsandbytes.functional.
dequantize_4bit``) in the dtype the layer was loaded in, so the export's LoRA merge
(:func:`mmtrain.model.lora.merge_lora_state_dict`) computes ``dequant(W) + scale * B @ A``
in float32 and rounds once to that dtype. The adapters were trained against ``dequant(W)``,
not against the original ``W``, so this is the function the run trained: the exported
model differs from the 4-bit model only by that one rounding of the merged weight (half a
bfloat16 ulp, 2^-9 relative, per weight), where merging into the original weights would
add the whole quantisation error back in (9% of the weights' norm for Gaussian weights in bfloat16).
The original weights are not kept.

Loading a state dict takes a full-precision ``weight`` (a resumed engine's, or an export's)
and quantises it; a weight equal to the layer's own dequantised one leaves the layer as it
is, so a save and load round trip keeps the 4-bit codes exactly.

The cost of a state dict. ``state_dict()`` builds every entry before a caller can drop
any: DeepSpeed's ``save_checkpoint(exclude_frozen_parameters=True)`` and Accelerate's
``save_state`` take the whole dict and only then remove the frozen weights. Dequantised
weights would cost 2 bytes a weight at every checkpoint (13.5 GB for a 7B LM), more than
the GPUs a 4-bit base is for. So the dequantised weight goes to host memory one layer at
a time (a GPU transient of one layer), and a checkpoint, which keeps trainable state
only, asks for the codes instead (:func:`codes_in_state_dict`): the frozen entries it
drops cost half a byte a weight on the device, no copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from mmtrain.model.fp8 import FrozenPackedLinear, frozen_linears

QUANT_TYPE = "nf4"
BLOCK_SIZE = 64  # weights per absmax (QLoRA's choice, bitsandbytes' default)
DOUBLE_QUANT_BLOCK = 256  # absmaxes per second-level scale under double quantisation
# Bits a weight costs: 4, its block's 8-bit absmax shared by 64, and a float32 scale shared by 64 x 256.
BITS_PER_WEIGHT = 4 + 8 / BLOCK_SIZE + 32 / (BLOCK_SIZE * DOUBLE_QUANT_BLOCK)


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def nf4_problem(device: torch.device | str) -> str | None:
    """Why NF4 layers cannot train on ``device`` (None: they can).

    A real probe, not a version table: one small weight is quantised on the device, and a
    product is run forward and backward through it, which is what training needs of the
    installed bitsandbytes' backend for that device.
    """
    if not bitsandbytes_installed():
        return "bitsandbytes is not installed (pip install 'mmtrain[qlora]')"
    device = torch.device(device)
    try:
        layer = NF4FrozenLinear(nn.Linear(128, 64, bias=False), device=device)
        x = torch.randn(4, 128, device=device, requires_grad=True)
        layer(x).sum().backward()
    except Exception as e:  # a backend that lacks the device's kernels raises its own errors
        return f"bitsandbytes cannot run NF4 on {device.type} here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


_STATE = threading.local()  # .codes: state_dict() writes the 4-bit codes (codes_in_state_dict)


@contextlib.contextmanager
def codes_in_state_dict():
    """Inside it, NF4 layers put their packed codes in ``state_dict()`` instead of the dequantised weight.

    For callers that drop the frozen entries anyway (checkpoints of trainable state): the
    dict is built without dequantising anything. Such a dict does not load back into an
    NF4 layer (its codes lack their block scales): exports must not be written inside it.
    """
    before = getattr(_STATE, "codes", False)
    _STATE.codes = True
    try:
        yield
    finally:
        _STATE.codes = before


def _bnb():
    import bitsandbytes

    return bitsandbytes


class NF4FrozenLinear(FrozenPackedLinear):
    """A frozen ``nn.Linear`` whose weight is held in NF4 with double-quantised block scales.

    ``weight`` is a frozen uint8 parameter holding two 4-bit codes a byte (what DeepSpeed's
    mixed-precision cast leaves alone: it casts floating-point tensors only, and
    :meth:`_apply` only moves it), ``quant_state`` bitsandbytes' block scales and code
    book, a plain attribute moved with the weight. ``in_features``/``out_features`` as
    the Linear had them; ``weight_dtype`` the dtype the weight was loaded in (what
    ``state_dict()`` writes).
    """

    weight_format = "nf4"

    def __init__(self, linear: nn.Linear, *, device: torch.device | None = None):
        super().__init__()
        functional = _bnb().functional
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        weight = weight if device is None else weight.to(device)
        self.weight_dtype = weight.dtype
        packed, state = functional.quantize_4bit(
            weight.contiguous(), blocksize=BLOCK_SIZE, compress_statistics=True, quant_type=QUANT_TYPE, quant_storage=torch.uint8
        )
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(packed.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            # matmul_4bit takes the weight transposed ([in, out] view of the packed codes),
            # as bitsandbytes' own Linear4bit passes it; the product runs in the input's dtype.
            out = _bnb().matmul_4bit(x.to(dtype), self.weight.t(), quant_state=self.quant_state)
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out

    def dequantized(self) -> torch.Tensor:
        """The weight the layer computes with, ``[out, in]`` in :attr:`weight_dtype`."""
        return _bnb().functional.dequantize_4bit(self.weight.detach(), self.quant_state).to(self.weight_dtype)

    def _move_scales(self, device: torch.device) -> None:
        self.quant_state.to(device)  # the block scales (and their own scales) travel with the codes

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if getattr(_STATE, "codes", False):
            destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        else:  # host memory, one layer dequantised on the device at a time (module docstring)
            destination[prefix + "weight"] = self.dequantized().to("cpu")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key, bias_key = prefix + "weight", prefix + "bias"
        if key in state_dict:
            value = state_dict[key]
            if value.dtype == torch.uint8:
                error_msgs.append(f"{key} holds 4-bit codes without their block scales (a checkpoint's frozen entry); load a full-precision weight")
            elif tuple(value.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: {tuple(value.shape)} vs {(self.out_features, self.in_features)}")
            elif not torch.equal(value.to(self.weight.device, self.weight_dtype), self.dequantized()):
                requantized = NF4FrozenLinear(_as_linear(value, self.weight_dtype), device=self.weight.device)
                self.weight, self.quant_state = requantized.weight, requantized.quant_state
        elif strict:
            missing_keys.append(key)
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            elif strict:
                missing_keys.append(bias_key)
        if strict:
            known = {key, bias_key}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known and "." not in k[len(prefix):])


def _as_linear(weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    return linear


@dataclass
class Quantization:
    """What :func:`quantize_frozen_linears` did: the names of the Linears now held in NF4."""

    converted: list[str] = field(default_factory=list)

    def describe(self, what: str) -> str:
        return f"nf4 {what}: {len(self.converted)} frozen Linear layers hold 4-bit NF4 weights (double-quantised scales)"


def quantizable_linears(root: nn.Module, scopes: list[nn.Module]) -> list[nn.Linear]:
    """The Linears :func:`quantize_frozen_linears` would convert (what the memory model counts at 4.127 bits)."""
    return [linear for _, _, _, linear in frozen_linears(root, scopes)]


def quantize_frozen_linears(root: nn.Module, scopes: list[nn.Module], *, device: torch.device | None = None) -> Quantization:
    """Replace every frozen ``nn.Linear`` inside ``scopes`` (sub-modules of ``root``) by an :class:`NF4FrozenLinear`.

    Trainable Linears (LoRA's ``lora_A``/``lora_B``, layers that train whole) stay as they
    are; a LoRA layer's frozen ``base_layer`` is converted beneath its adapters. ``device``:
    where to quantise and keep the codes (the GPU; None: where each weight is). Each
    layer's full-precision weight is freed once its codes exist. Idempotent.
    """
    result = Quantization()
    for name, parent, attribute, linear in frozen_linears(root, scopes):
        setattr(parent, attribute, NF4FrozenLinear(linear, device=device))
        result.converted.append(name)
    return result
