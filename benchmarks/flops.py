"""FLOPs and MFU of a training step, by the project's convention.

FLOPs per sample of ``s`` LM input tokens: ``4·N·s`` with N the base LM's parameter
count, frozen weights and embeddings included (forward 2N, backward 2N for activation
gradients; frozen weights need no weight gradient; recomputation from checkpointing and
the vision encoder's forward are not counted), plus attention ``4·s²·h·L`` (h width, L
layers): the two s×s products of a layer (QKᵀ and PV), 2·s²·h each over the full
square, counted once. A causal kernel does half of that forward, and its backward
(gradients of Q, K and V through both products) twice its forward, so a causal forward +
backward count is 3 × 2·s²·h·L = ``6·s²·h·L``; MFU under that count is reported beside as
``mfu_attention_6``. MFU is achieved FLOP/s over the device's dense bf16 peak
(:data:`PEAK_TFLOPS`, by device name; the bench's ``--peak_tflops`` overrides it). Packed
rows (``--packing``, ``--max_tokens_per_batch``) are counted per sample as well: their
attention never crosses samples. mmtrain runs the LM head at label positions only, yet is credited 4N per token
like the plain loop.
"""

from __future__ import annotations

import torch

PEAK_TFLOPS_H100 = 989.0

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, matched
# in order against torch.cuda.get_device_name(): the PCIe and NVL H100s come before "H100".
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", PEAK_TFLOPS_H100),  # SXM5, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
)


def dense_bf16_peak(device_name: str) -> tuple[float, str] | None:
    """(peak TFLOP/s, the table entry that matched) for a device name, or None for a device not in the table."""
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak, key
    return None

CONVENTION = (
    "per sample of s LM input tokens: 4*N*s + 4*s^2*h*L (N base LM parameters incl. frozen and embeddings, "
    "h hidden size, L layers); mfu_attention_6 uses 6*s^2*h*L; recomputation and the vision forward are not counted"
)


def lm_shape(lm: str) -> dict:
    """Base parameter count N, width and layers of the language model (from its config, on the meta device)."""
    from transformers import AutoModelForCausalLM

    from mmtrain.model.language import load_language_config

    config = load_language_config(lm)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "hidden": config.hidden_size, "layers": config.num_hidden_layers}


def sample_flops(lengths: list[int], shape: dict, attention_coeff: float = 4.0) -> float:
    n, h, layers = shape["params"], shape["hidden"], shape["layers"]
    return sum(4.0 * n * s + attention_coeff * s * s * h * layers for s in lengths)


def figures(seconds: float, lengths: list[int], shape: dict, peak_tflops: float | None) -> dict:
    """Throughput and MFU of ``lengths`` (tokens of each sample) trained in ``seconds`` (MFU None without a peak)."""
    tokens = sum(lengths)
    flops = sample_flops(lengths, shape)
    if not peak_tflops:
        return {"seconds": seconds, "samples": len(lengths), "tokens": tokens, "tokens_per_s": tokens / seconds,
                "samples_per_s": len(lengths) / seconds, "tflops_per_s": flops / seconds / 1e12, "mfu": None, "mfu_attention_6": None}
    return {
        "seconds": seconds,
        "samples": len(lengths),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": len(lengths) / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_tflops * 1e12),
        "mfu_attention_6": sample_flops(lengths, shape, 6.0) / seconds / (peak_tflops * 1e12),
    }
