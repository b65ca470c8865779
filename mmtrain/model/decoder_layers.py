"""Per-decoder-layer switches of the language model: selective checkpointing and regional compilation.

Both act on the repeated blocks of the LM (``model.layers``, ``gpt_neox.layers``,
``transformer.h``: :func:`decoder_layers` finds them in the model), one block at a time:

* **selective activation checkpointing** recomputes only the first N blocks in
  backward. Memory falls by about N/num_layers of the blocks' activations, while the
  recomputation costs one extra forward of N blocks (about N/num_layers x 50% of a
  step's FLOPs with a frozen base), so N is best the smallest that fits the batch;
* **regional compilation** compiles each block with ``torch.compile`` rather than the
  whole model: all blocks share one compiled graph (same code, weights are inputs), so
  compilation costs one block's time, and the parts that trip the compiler (image
  scatter, loss on label positions, MMCA's planning) stay eager around it.
  ``nn.Module.compile`` compiles in place, so parameter names, checkpoints and exports
  are those of the eager model.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtrain.compat import torch as torch_compat
from mmtrain.model.errors import ConfigError


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The LM's repeated decoder blocks, found from the model itself.

    The decoder (``get_decoder()``: ``model`` of LLaMA, Qwen2, Gemma, ...; ``gpt_neox`` of
    GPT-NeoX; ``transformer`` of Falcon) holds them as its ``layers`` ModuleList, or,
    where it names them otherwise (Falcon's ``h``), as a ModuleList of one block class
    with ``num_hidden_layers`` entries (the longest such list when none has that many),
    the decoder's own children first.
    """
    layers, _ = _find_decoder_layers(language_model)
    return layers


def decoder_layer_scope(language_model: nn.Module) -> str:
    """The qualified name of :func:`decoder_layers` with a trailing dot (``model.layers.``, ``gpt_neox.layers.``,
    ``transformer.h.``): what ``--lang_lora_module_name auto`` stands for."""
    _, name = _find_decoder_layers(language_model)
    return f"{name}."


def _find_decoder_layers(language_model: nn.Module) -> tuple[nn.ModuleList, str]:
    get_decoder = getattr(language_model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else language_model
    decoder = decoder if isinstance(decoder, nn.Module) else language_model
    layers = getattr(decoder, "layers", None)
    if not (isinstance(layers, nn.ModuleList) and len(layers)):
        expected = getattr(getattr(language_model, "config", None), "num_hidden_layers", None)
        # the decoder's own lists first: a list deeper down (a layer's experts) is a part of one block
        for modules in (decoder.children(), decoder.modules()):
            lists = [m for m in modules if isinstance(m, nn.ModuleList) and len(m) and _one_block_class(m)]
            matching = [m for m in lists if len(m) == expected] or lists
            layers = max(matching, key=len, default=None)
            if layers is not None:
                break
    if layers is None:
        raise ConfigError(
            f"{type(language_model).__name__} has no list of decoder layers (no ModuleList of one block class in "
            f"{type(decoder).__name__}); for LoRA, give lang_lora_module_name a scope of module names",
            fields=("lang_lora_module_name",),
        )
    name = next(n for n, m in language_model.named_modules() if m is layers)
    return layers, name


def _one_block_class(modules: nn.ModuleList) -> bool:
    return len({type(m) for m in modules}) == 1


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on every layer of a transformers model, non-reentrant.

    Reentrant checkpointing drops the LoRA gradients of blocks whose inputs do not
    require grad. transformers 5 renamed the switch; both names are accepted.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_first_layers(language_model: nn.Module, n: int) -> list[int]:
    """Checkpoint decoder layers ``0..n-1`` only (0: none); returns their indices.

    Uses transformers' own per-layer flag (``GradientCheckpointingLayer.gradient_checkpointing``)
    after enabling checkpointing model-wide, non-reentrant (reentrant checkpointing drops
    the LoRA gradients of blocks whose inputs do not require grad).
    """
    layers = decoder_layers(language_model)
    if not 0 <= n <= len(layers):
        raise ConfigError(
            f"gradient_checkpointing_layers {n}: the language model has {len(layers)} decoder layers", fields=("gradient_checkpointing_layers",)
        )
    if n == 0:
        return []
    enable_checkpointing(language_model)
    for index, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise ConfigError(
                f"gradient_checkpointing_layers: {type(layer).__name__} has no per-layer checkpointing switch", fields=("gradient_checkpointing_layers",)
            )
        layer.gradient_checkpointing = index < n
    return list(range(n))


def compile_decoder_layers(language_model: nn.Module, *, hooks_outside: bool = False, **compile_kwargs) -> int:
    """Compile every decoder layer in place (regional compilation); returns how many.

    ``hooks_outside``: compile only each layer's ``forward``, so that hooks registered on
    the layer later (ZeRO-3's, which gather the layer's partitioned weights on entry and
    release them on exit) run eagerly around the compiled code instead of inside it.
    """
    if not hasattr(torch, "compile"):
        raise ConfigError("compile_decoder_layers: this torch has no torch.compile", fields=("compile_decoder_layers",))
    torch_compat.disable_inductor_matmul_padding()  # a torch bug with dynamic token counts (see there)
    layers = decoder_layers(language_model)
    for layer in layers:
        if hooks_outside:
            layer.forward = torch.compile(layer.forward, **compile_kwargs)
        else:
            layer.compile(**compile_kwargs)
    return len(layers)
