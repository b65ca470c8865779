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
forward or backward), and is then multiplied by zero. Each call sees only the tokens it
can involve: the text term gathers the text queries and keys, the image term the image
keys, so MMCA scores about ``text^2 + tokens * image_tokens`` pairs rather than twice
``tokens^2``.

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
sequence seen so far) are not supported. ``GenerationMixin.generate`` refuses keyword
arguments the model does not declare, so MMCA decoding calls the model step by step
with ``cache=`` (a greedy loop is a few lines); generating without the mask would
silently fall back to plain causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface

from mmtrain.compat import transformers as transformers_compat
from mmtrain.compat.transformers import repeat_kv
from mmtrain.model.errors import ConfigError

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


@dataclass
class _Plan:
    """Everything about one forward's MMCA that does not depend on the layer.

    ``*_index`` gathers a row's tokens of one kind, in order, padded (beyond the row's
    own count) with tokens of the other kind. ``text_mask`` is None where the text term
    is plain causal attention over the gathered text tokens, so SDPA can take its
    ``is_causal`` kernels.
    """

    text_query_index: torch.Tensor  # [B, Nt_q] into the query axis
    text_key_index: torch.Tensor  # [B, Nt_k] into the key axis
    text_mask: torch.Tensor | None  # [B, 1, Nt_q, Nt_k]
    text_rows: torch.Tensor  # [B, 1, Nt_q, 1] rows that have a valid key
    image_key_index: torch.Tensor  # [B, Ni] into the key axis
    image_mask: torch.Tensor  # [B, 1, Q, Ni]
    image_rows: torch.Tensor  # [B, 1, Q, 1]
    attention_mask: torch.Tensor | None  # the mask this plan was made for


def _first(flags: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True positions of each row, in order, padded to ``count`` with the others."""
    order = torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices[:, :count]
    valid = torch.arange(count, device=flags.device)[None, :] < flags.sum(dim=1, keepdim=True)
    return order, valid


def _with_one_key(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask with key 0 opened on rows that have no valid key, and which rows had one.

    A fully masked row gives NaN or a uniform softmax depending on the SDPA backend; with
    one key it stays finite in forward and backward, and its row is then zeroed.
    """
    rows = mask.any(dim=-1, keepdim=True)
    if mask.shape[-1] == 0:
        return mask, rows
    first_key = torch.zeros(mask.shape[-1], dtype=torch.bool, device=mask.device)
    first_key[0] = True
    return mask | (~rows & first_key), rows


def _plan(attention_mask, is_image: torch.Tensor, q_len: int, image_attention: str) -> _Plan:
    batch, k_len = is_image.shape
    device = is_image.device
    allowed = _allowed_keys(attention_mask, q_len, k_len, device).expand(batch, 1, q_len, k_len)
    is_text = ~is_image
    query_text, query_image = is_text[:, k_len - q_len :], is_image[:, k_len - q_len :]
    counts = torch.stack([query_text.sum(1), is_text.sum(1), is_image.sum(1)]).amax(dim=1).tolist()

    q_index, q_valid = _first(query_text, counts[0])
    k_index, k_valid = _first(is_text, counts[1])
    text_mask = allowed.gather(2, q_index[:, None, :, None].expand(batch, 1, counts[0], k_len))
    text_mask = text_mask.gather(3, k_index[:, None, None, :].expand(batch, 1, counts[0], counts[1]))
    text_mask = text_mask & k_valid[:, None, None, :] & q_valid[:, None, :, None]
    text_mask, text_rows = _with_one_key(text_mask)
    if q_len == k_len and counts[0]:
        # Among real text tokens, is the model's mask just causal (no padding, no packing)?
        causal = torch.ones(counts[0], counts[0], dtype=torch.bool, device=device).tril()
        pairs = q_valid[:, None, :, None] & k_valid[:, None, None, :]
        if bool(((text_mask == causal) | ~pairs).all()):
            text_mask = None

    image_index_, image_valid = _first(is_image, counts[2])
    image_mask = allowed.gather(3, image_index_[:, None, None, :].expand(batch, 1, q_len, counts[2]))
    if image_attention == "same_image":
        image_of = image_index(is_image)
        own = image_of[:, k_len - q_len :, None] == image_of.gather(1, image_index_)[:, None, :]
    else:
        own = torch.arange(k_len - q_len, k_len, device=device)[None, :, None] == image_index_[:, None, :]
    image_mask = image_mask & (image_valid[:, None, :] & (~query_image[:, :, None] | own))[:, None]
    image_mask, image_rows = _with_one_key(image_mask)
    return _Plan(q_index, k_index, text_mask, text_rows, image_index_, image_mask, image_rows, attention_mask)


# Always eager, also inside compiled decoder layers: the plan's sizes come from counting
# tokens on the device. Traced, those counts became symbolic sizes without a source, and
# torch.compile failed building its guards at the first batch of a new length
# (tests/model/test_speed_features.py). Eager, the plan is made once per forward and the
# compiled code around it sees its tensors as ordinary inputs.
@torch.compiler.disable
def _cached_plan(image_mask, attention_mask, is_image: torch.Tensor, q_len: int, image_attention: str) -> _Plan:
    """The plan, kept on the image-mask tensor that every layer of one forward receives.

    Making it reads token counts back from the device; that, and building the masks,
    happens once per forward instead of once per layer.
    """
    if image_mask is None:
        return _plan(attention_mask, is_image, q_len, image_attention)
    if not hasattr(image_mask, "_mmca_plans"):
        image_mask._mmca_plans = {}
    key = (q_len, is_image.shape[1], str(is_image.device), image_attention, id(attention_mask))
    plan = image_mask._mmca_plans.get(key)
    if plan is None or plan.attention_mask is not attention_mask:
        plan = image_mask._mmca_plans[key] = _plan(attention_mask, is_image, q_len, image_attention)
    return plan


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, :, index[b]]`` for ``x`` of shape ``[B, H, T, D]``."""
    return x.gather(2, index[:, None, :, None].expand(x.shape[0], x.shape[1], index.shape[1], x.shape[3]))


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
    """Both MMCA terms, each computed only over the tokens it can involve.

    The text term runs on the text queries and text keys alone (gathered), the image
    term on all queries against the image keys alone.
    """
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    groups = getattr(module, "num_key_value_groups", 1)
    is_image = _image_flags(mmca_image_mask, batch, k_len, query.device)
    plan = _cached_plan(mmca_image_mask, attention_mask, is_image, q_len, image_attention)
    out = query.new_zeros(batch, heads, q_len, dim)

    q_index, k_index = plan.text_query_index, plan.text_key_index
    if q_index.shape[1] and k_index.shape[1]:
        text = F.scaled_dot_product_attention(
            _gather_tokens(query, q_index),
            repeat_kv(_gather_tokens(key, k_index), groups),
            repeat_kv(_gather_tokens(value, k_index), groups),
            attn_mask=plan.text_mask,
            is_causal=plan.text_mask is None,
            dropout_p=dropout,
            scale=scaling,
        )
        # Padding slots are zeroed; they point at image queries, which get no text term.
        text = text * plan.text_rows.to(text.dtype)
        out = out.scatter(2, q_index[:, None, :, None].expand_as(text), text)

    k_index = plan.image_key_index
    if k_index.shape[1]:
        image = F.scaled_dot_product_attention(
            query,
            repeat_kv(_gather_tokens(key, k_index), groups),
            repeat_kv(_gather_tokens(value, k_index), groups),
            attn_mask=plan.image_mask,
            dropout_p=dropout,
            scale=scaling,
        )
        out = out + image * plan.image_rows.to(image.dtype)
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
    return transformers_compat.sdpa_mask_materialized(*args, **kwargs)


def register_mmca() -> None:
    """Make ``"mmca"`` and ``"mmca_self"`` known attention implementations (idempotent)."""
    AttentionInterface.register(ATTENTION_NAMES["same_image"], mmca_attention_forward)
    AttentionInterface.register(ATTENTION_NAMES["self"], mmca_self_attention_forward)
    for name in ATTENTION_NAMES.values():
        transformers_compat.register_attention_mask(name, mmca_mask)


def enable_mmca(language_model: nn.Module, image_attention: str = "same_image") -> None:
    """Switch ``language_model`` (a transformers model) to MMCA; raises if it cannot dispatch it."""
    if image_attention not in IMAGE_ATTENTION:
        raise ValueError(f"image_attention {image_attention!r}: valid are {', '.join(IMAGE_ATTENTION)}")
    from mmtrain.model.attention import attention_for  # attention.py imports this module

    _, why = attention_for(type(language_model), "sdpa")
    if why:  # e.g. capped attention logits, which MMCA's SDPA calls would drop
        raise ConfigError(f"enable_mmca_attention: MMCA computes its attention through SDPA, and {why}", fields=("enable_mmca_attention",))
    register_mmca()
    name = ATTENTION_NAMES[image_attention]
    language_model.set_attn_implementation(name)
    if transformers_compat.attn_implementation(language_model.config) != name:
        raise ConfigError(
            f"enable_mmca_attention: {type(language_model).__name__} does not route attention through "
            "transformers' AttentionInterface, so MMCA cannot be plugged in (LLaMA, Qwen2, Mistral, ... can)",
            fields=("enable_mmca_attention",),
        )


def uses_mmca(language_model: nn.Module) -> bool:
    config = getattr(language_model, "config", None)
    return transformers_compat.attn_implementation(config) in ATTENTION_NAMES.values()


def mmca_lm_kwargs(language_model: nn.Module, input_ids: torch.Tensor, image_id: int) -> dict[str, torch.Tensor]:
    """Keyword arguments for the decoder call: the image-token mask when MMCA is on, else nothing."""
    if not uses_mmca(language_model):
        return {}
    return {IMAGE_MASK_KWARG: input_ids == image_id}
