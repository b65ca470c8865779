"""Answer prompts with images: left-padded batches, decoded token by token with a KV cache.

We decode with our own short loop rather than ``generate()``: the language model must
see the same attention inputs as in training (MMCA's image-token mask, positions that
ignore left padding), and ``generate()`` does not pass such model arguments through.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from mmtrain.model.attention import decoder_kwargs
from mmtrain.model.vlm import VisionLanguageModel


@dataclass
class SamplingOptions:
    max_new_tokens: int = 32
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def _pick(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    if not options.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(options.temperature, 1e-5)
    if options.top_k:
        kth = logits.topk(min(options.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > options.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1)[:, 0]


def _cache_argument(decoder) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    prompts: list[torch.Tensor],
    images: list[torch.Tensor],
    *,
    eos_token_id: int,
    pad_token_id: int,
    options: SamplingOptions = SamplingOptions(),
    image_features: list[torch.Tensor] | None = None,
    image_sizes: list[torch.Tensor] | None = None,
    videos: list[torch.Tensor | None] | None = None,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (stopping at eos, which is dropped).

    ``prompts[i]`` are token ids with image spans already in place and ``images[i]`` its
    pixel values ``[n_i, 3, H, W]`` in span order. ``image_features[i]``, when given,
    replaces encoding ``images[i]`` (the chat keeps earlier turns' features this way).
    With AnyRes tiles ``images[i]`` holds each image's tiles and ``image_sizes[i]`` the
    images' ``(height, width)`` ``[n_i, 2]``. ``videos[i]``, where the prompt has video
    spans, holds the frames of its videos ``[f_i, 3, H, W]`` in span order (None: none).
    ``synced_gpus`` keeps decoding until ``max_new_tokens`` so that every rank runs the
    same number of forwards (ZeRO-3 gathers parameters collectively).
    """
    device = next(model.language_model.parameters()).device
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = p.to(device)
        mask[i, longest - len(p) :] = 1
    sizes = None
    if model.image_tokens.sized is not None:
        if image_sizes is None:
            raise ValueError("a model whose image token counts follow image sizes generates from images with their sizes (image_sizes)")
        sizes = torch.cat([s.reshape(-1, 2) for s in image_sizes]).to(torch.long)
    frames = [v.to(device) for v in videos or [] if v is not None and v.shape[0]]
    frames = torch.cat(frames) if frames else None
    frame_features = None
    if image_features is None:
        vision = model.vision
        pixels = [im.to(device) for im in images if im.shape[0]]
        pixels = torch.cat(pixels) if pixels else torch.zeros(0, *vision.pixel_shape, device=device)
        both = model.encode_images(pixels if frames is None else torch.cat([pixels, frames.to(pixels.dtype)]), None if frames is not None else sizes)
        features, frame_features = both[: pixels.shape[0]], (None if frames is None else both[pixels.shape[0] :])
    else:
        features = torch.cat([f.to(device) for f in image_features])
        frame_features = None if frames is None else model.encode_images(frames)
    lm = model.language_model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    extra = decoder_kwargs(lm, ids, model.image_tokens.image_id)  # new tokens count as text; no packed rows here
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
    cache = {_cache_argument(decoder): DynamicCache()}
    hidden = decoder(
        inputs_embeds=model.embed(
            ids, features, image_sizes=sizes, video_positions=None if frame_features is None else model.video_positions(frame_features),
        ),
        attention_mask=mask, position_ids=positions, use_cache=True, **cache, **extra,
    ).last_hidden_state
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(options.max_new_tokens):
        token = _pick(head(hidden[:, -1]), options)
        token = token.masked_fill(finished, pad_token_id)
        generated.append(token)
        finished |= token == eos_token_id
        if finished.all() and not synced_gpus:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        hidden = decoder(
            inputs_embeds=model.language_model.get_input_embeddings()(token[:, None]), attention_mask=mask,
            position_ids=positions, use_cache=True, **cache, **extra,
        ).last_hidden_state
    rows = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in prompts]
    results = []
    for row in rows:
        if eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        results.append([t for t in row if t != pad_token_id])
    return results
