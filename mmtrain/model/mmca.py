"""Multi-modal causal attention (MMCA), plugged into transformers' attention interface.

MMCA, from DeepSpeed-VisualChat, splits what a token attends to by the kind of key:

* a **text** query attends causally to earlier text keys and, *separately normalised*,
  to earlier image keys; the two attention outputs are summed. Image tokens thus
  cannot crowd text out of a single softmax, however many of them there are;
* an **image** query attends to image keys of its own image only, never to text.

Each term is exactly zero on a row that has no valid key. The DeepSpeed-VisualChat code
gets this wrong: a fully masked row there gets a uniform softmax, so every text token
before the first image (a system prompt) attends to all the *future* image tokens. Here
the two terms are two calls of the fused SDPA kernel with two boolean masks; a row
without a valid key is given one harmless key so the kernel stays finite (no NaN in
forward or backward), and is then multiplied by zero.

Which tokens are images: ``<image>`` tokens only. ``<im_start>`` and ``<im_end>`` are
text: they are real tokens with trained embeddings, so a text query attends to them in
the text term and they frame each image for the text that follows. Image k of a sample
is the k-th run of consecutive ``<image>`` tokens (spans are always separated by
``<im_end>``/``<im_start>``), so the image index is a cumulative count of run starts.

Image queries, two choices (``--mmca_image_attention``):

* ``same_image`` (default): causal attention inside the token's own image. The LM can
  relate patches of one image to each other (as any LLaVA-style model does) while images
  stay independent of each other and of the text.
* ``self``: each image token sees only itself, as DeepSpeed-VisualChat does. Image
  positions then never mix inside the LM: every layer maps each patch on its own.

Both are causal, so no token ever receives weight from a later position.

How it reaches the model: :func:`enable_mmca` switches the LM's attention implementation
to ``"mmca"`` (or ``"mmca_self"``), registered in ``AttentionInterface`` with a mask
function in ``AttentionMaskInterface`` that always materialises the boolean
causal/padding/packed-document mask. The per-token image flags travel as the keyword
``mmca_image_mask`` (``[batch, tokens]`` bool) from the decoder call down to every
attention layer; :func:`mmca_lm_kwargs` builds it from ``input_ids``. Without it every
token counts as text, which is plain causal attention.

Generation with a KV cache works with transformers' ``DynamicCache``: the queries are
the last positions of the key axis, and ``mmca_image_mask`` may be the prompt's mask
only, since positions past its end (generated tokens) count as text. A new text token
then attends to cached text keys and cached image keys in two separate softmaxes,
exactly as in a forward over the whole sequence. Static caches (keys longer than the
sequence seen so far) are not supported.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMAGE_MASK_KWARG = "mmca_image_mask"
IMAGE_ATTENTION = ("same_image", "self")
ATTENTION_NAMES = {"same_image": "mmca", "self": "mmca_self"}


def image_index(is_image: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` long: 0 on text, k on the tokens of the k-th image (run of image tokens)."""
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return torch.cumsum(starts, dim=1) * is_image


def _allowed_keys(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """The model's own mask (causal, padding, packed documents) as bool ``[b, 1, Q, K]``."""
    if attention_mask is None:
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        return (torch.arange(k_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if attention_mask.dtype != torch.bool:
        # An additive float mask: 0 where allowed, a large negative number where not.
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[..., :k_len]


def mmca_masks(
    allowed: torch.Tensor, is_image: torch.Tensor, q_len: int, image_attention: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text-key and image-key masks ``[B, 1, Q, K]`` and their row multipliers ``[B, 1, Q, 1]``.

    ``allowed`` is the model's mask; ``is_image`` flags the keys ``[B, K]``, the queries
    being its last ``q_len`` positions. A row with no valid key gets key 0 unmasked so
    SDPA stays finite; its multiplier is False, which zeroes the row's output.
    """
    k_len = is_image.shape[1]
    key_image = is_image[:, None, None, :]
    query_image = is_image[:, None, k_len - q_len :, None]
    text_mask = allowed & ~key_image & ~query_image
    if image_attention == "same_image":
        index = image_index(is_image)
        same_image = index[:, None, k_len - q_len :, None] == index[:, None, None, :]
    else:
        q_pos = torch.arange(k_len - q_len, k_len, device=is_image.device)
        same_image = (q_pos[:, None] == torch.arange(k_len, device=is_image.device)[None, :])[None, None]
    image_mask = allowed & key_image & (~query_image | same_image)

    first_key = torch.zeros(k_len, dtype=torch.bool, device=is_image.device)
    first_key[0] = True
    text_rows = text_mask.any(dim=-1, keepdim=True)
    image_rows = image_mask.any(dim=-1, keepdim=True)
    text_mask = text_mask | (~text_rows & first_key)
    image_mask = image_mask | (~image_rows & first_key)
    return text_mask, image_mask, text_rows, image_rows


def _image_flags(image_mask: torch.Tensor | None, batch: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Image flags over the key axis: the given mask, padded with text (False) to ``k_len``."""
    if image_mask is None:
        return torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    image_mask = image_mask.to(device=device, dtype=torch.bool)
    seen = image_mask.shape[1]
    if seen > k_len:
        raise ValueError(
            f"{IMAGE_MASK_KWARG} covers {seen} tokens but attention has only {k_len} keys; "
            "it must flag the tokens seen so far (cache included), not more"
        )
    if seen < k_len:
        image_mask = F.pad(image_mask, (0, k_len - seen), value=False)
    return image_mask


def _mmca_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    image_attention: str,
    dropout: float = 0.0,
    scaling: float | None = None,
    mmca_image_mask: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch, _, q_len, _ = query.shape
    k_len = key.shape[2]
    groups = getattr(module, "num_key_value_groups", 1)
    key = repeat_kv(key, groups)
    value = repeat_kv(value, groups)

    allowed = _allowed_keys(attention_mask, q_len, k_len, query.device)
    is_image = _image_flags(mmca_image_mask, batch, k_len, query.device)
    text_mask, image_mask, text_rows, image_rows = mmca_masks(allowed, is_image, q_len, image_attention)

    text_out = F.scaled_dot_product_attention(query, key, value, attn_mask=text_mask, dropout_p=dropout, scale=scaling)
    image_out = F.scaled_dot_product_attention(query, key, value, attn_mask=image_mask, dropout_p=dropout, scale=scaling)
    out = text_out * text_rows.to(query.dtype) + image_out * image_rows.to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def mmca_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` function: text and image terms, image queries within their image."""
    return _mmca_attention(module, query, key, value, attention_mask, image_attention="same_image", **kwargs)


def mmca_self_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` function: text and image terms, each image query sees itself only."""
    return _mmca_attention(module, query, key, value, attention_mask, image_attention="self", **kwargs)


def mmca_mask(*args, **kwargs) -> torch.Tensor:
    """``AttentionMaskInterface`` function: SDPA's boolean mask, never skipped for ``is_causal``.

    The attention function intersects this mask with the text/image masks, so it must
    exist even when it would be a plain causal mask.
    """
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_mmca() -> None:
    """Make ``"mmca"`` and ``"mmca_self"`` known attention implementations (idempotent)."""
    AttentionInterface.register(ATTENTION_NAMES["same_image"], mmca_attention_forward)
    AttentionInterface.register(ATTENTION_NAMES["self"], mmca_self_attention_forward)
    for name in ATTENTION_NAMES.values():
        AttentionMaskInterface.register(name, mmca_mask)


def enable_mmca(language_model: nn.Module, image_attention: str = "same_image") -> None:
    """Switch ``language_model`` (a transformers model) to MMCA; raises if it cannot dispatch it."""
    if image_attention not in IMAGE_ATTENTION:
        raise ValueError(f"image_attention {image_attention!r}: valid are {', '.join(IMAGE_ATTENTION)}")
    register_mmca()
    name = ATTENTION_NAMES[image_attention]
    language_model.set_attn_implementation(name)
    if language_model.config._attn_implementation != name:
        raise ValueError(
            f"--enable_mmca_attention: {type(language_model).__name__} does not route attention through "
            "transformers' AttentionInterface, so MMCA cannot be plugged in (LLaMA, Qwen2, Mistral, ... can)"
        )


def uses_mmca(language_model: nn.Module) -> bool:
    config = getattr(language_model, "config", None)
    return getattr(config, "_attn_implementation", None) in ATTENTION_NAMES.values()


def mmca_lm_kwargs(language_model: nn.Module, input_ids: torch.Tensor, image_id: int) -> dict[str, torch.Tensor]:
    """Keyword arguments for the decoder call: the image-token mask when MMCA is on, else nothing."""
    if not uses_mmca(language_model):
        return {}
    return {IMAGE_MASK_KWARG: input_ids == image_id}
