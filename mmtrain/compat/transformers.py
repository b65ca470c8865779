"""transformers internals: the resolved attention implementation, mask builders, scaled embeddings, the DeepSpeed config it holds.

``repeat_kv`` and ``create_causal_mask`` are transformers' own functions, resolved lazily
by the module ``__getattr__`` so that an importer gets them unwrapped and transformers
loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from mmtrain.compat import lazy_attributes

if TYPE_CHECKING:
    from transformers.integrations.sdpa_attention import repeat_kv  # noqa: F401
    from transformers.masking_utils import create_causal_mask  # noqa: F401


def attn_implementation(config) -> str | None:
    """The attention implementation a transformers model actually dispatches to (None if unknown).

    transformers keeps the resolved choice (after ``from_pretrained``'s checks and
    ``set_attn_implementation``) only in the private ``config._attn_implementation``;
    the public ``attn_implementation`` argument is consumed at load time. MMCA reads it
    to know whether it is active (and so whether to pass the image-token mask), packing
    to name the implementation in its error, export to refuse MMCA models. If the field
    were renamed this would return None and MMCA would silently run as plain causal
    attention, hence the test.
    """
    return getattr(config, "_attn_implementation", None)


# The class flags transformers checks before it lets a model run an attention
# implementation (``PreTrainedModel.get_correct_attn_implementation``): asked for
# explicitly, an implementation whose flag is False is a ValueError at construction.
_ATTENTION_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}


def supports_attention(model_class: type, name: str) -> bool:
    """Whether transformers lets ``model_class`` run attention implementation ``name`` (eager always).

    Read from the private class flags ``_supports_sdpa`` / ``_supports_flex_attn``, which
    transformers itself checks, so that the choice is made from the class before any
    weights load. Were a flag renamed this would answer False, and mmtrain would run
    such a model with eager attention: slower, never wrong (the test catches it).
    """
    if name == "eager":
        return True
    flag = _ATTENTION_SUPPORT_FLAGS.get(name)
    if flag is None:
        raise ValueError(f"unknown attention implementation {name!r}: known are eager, {', '.join(_ATTENTION_SUPPORT_FLAGS)}")
    return bool(getattr(model_class, flag, False))


def embedding_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor a transformers embedding table multiplies its rows by (Gemma's ``sqrt(hidden)``), or None.

    Gemma, Gemma 2 and Gemma 3 look up through a ``...ScaledWordEmbedding`` whose forward
    multiplies by its undocumented ``embed_scale`` buffer. mmtrain's trainable new-token
    rows sit beside the table (``NewTokenEmbedding``) and must be scaled alike, since an
    export writes them into the table. Were the buffer renamed this would answer None and
    the new tokens would read unscaled rows in training only (the test catches it).
    """
    scale = getattr(embedding, "embed_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def sdpa_mask_materialized(*args, **kwargs) -> torch.Tensor:
    """transformers' SDPA boolean mask ``[batch, 1, q, kv]`` (True: attend), always built, never None.

    ``transformers.masking_utils.sdpa_mask`` returns None for a plain causal mask so that
    SDPA can use ``is_causal``; ``allow_is_causal_skip=False`` (an undocumented keyword
    of that internal builder) turns that off. MMCA intersects this mask with its
    text/image masks, so it asks for it even when it is plain causal. ``sdpa_mask``
    takes ``**kwargs``: were the keyword dropped or renamed, it would be swallowed
    silently and MMCA would be handed None again.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def attention_mask_builder(name: str) -> Callable[..., torch.Tensor | None]:
    """The mask builder transformers registered for attention implementation ``name`` (e.g. ``"sdpa"``).

    Looked up through ``AttentionMaskInterface`` (see :func:`register_attention_mask`); it
    takes the keyword arguments of the internal ``sdpa_mask``.
    """
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionMaskInterface()[name]


def register_attention_mask(name: str, mask_function: Callable[..., torch.Tensor | None]) -> None:
    """Make ``mask_function`` the mask builder of attention implementation ``name``.

    ``AttentionMaskInterface`` lives in ``transformers.masking_utils`` and is described
    only in the attention-interface guide; the keyword arguments it passes to the
    function (``batch_size``, ``q_length``, ``kv_length``, ``attention_mask``,
    ``allow_is_causal_skip``, ...) are those of the internal ``sdpa_mask``. Without a
    registered builder, transformers has no mask for a custom attention (MMCA) and its
    models fail in ``create_causal_mask``.
    """
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(name, mask_function)


def unset_hf_deepspeed_config() -> None:
    """Drop the DeepSpeed config transformers holds, so ``is_deepspeed_zero3_enabled()`` is False.

    A private helper of ``transformers.integrations.deepspeed`` (made for unit tests).
    We use it to load the frozen vision encoder whole at ZeRO-3: accelerate's own
    ``zero3_init_context_manager(enable=False)`` re-installs the stage-3 config, so
    ``from_pretrained`` would still partition. If it stopped clearing the config, the
    encoder would be partitioned outside the engine and never gathered.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config as unset

    unset()


def naflex_size(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The size SigLIP2's NaFlex processor resizes an image to (its patch grid times the patch), as it computes it.

    A function of transformers' SigLIP2 image-processing module, not of its public API; the
    PIL backend's module is read first (the torchvision one imports torchvision).
    """
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches
    except ImportError:
        from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches
    return tuple(get_image_size_for_max_num_patches(height, width, patch, max_patches))


def _repeat_kv():
    # transformers' helper that expands grouped key/value heads to the query heads
    # ([B, kv_heads, T, D] -> [B, kv_heads * n_rep, T, D], each head repeated n_rep times
    # in place). Internal to its SDPA integration; MMCA uses it so that its attention
    # treats grouped-query models exactly as transformers' own SDPA path does.
    from transformers.integrations.sdpa_attention import repeat_kv

    return repeat_kv


def _create_causal_mask():
    # The mask builder every transformers decoder calls; internal, and its signature
    # changes between releases (input_embeds -> inputs_embeds, past_key_values -> cache),
    # which is why packing calls it with only the arguments its signature names. Packing
    # asks it whether restarts of position_ids become per-sample masks.
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask


_LAZY = {"repeat_kv": _repeat_kv, "create_causal_mask": _create_causal_mask}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
