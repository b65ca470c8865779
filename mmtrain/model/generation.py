"""Answer prompts with images: left-padded batches through transformers' ``generate``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtrain.model.vlm import VisionLanguageModel


@dataclass
class SamplingOptions:
    max_new_tokens: int = 32
    do_sample: bool = False  # greedy by default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


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
    synced_gpus: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (stopping at eos, which is dropped).

    ``prompts[i]`` are token ids with image spans already in place and ``images[i]`` its
    pixel values ``[n_i, 3, H, W]`` in span order. ``image_features[i]``, when given,
    replaces encoding ``images[i]`` (the chat keeps earlier turns' features this way).
    """
    device = next(model.language_model.parameters()).device
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = p.to(device)
        mask[i, longest - len(p) :] = 1
    if image_features is None:
        pixels = torch.cat([im.to(device) for im in images]) if images else torch.zeros(0, 3, 1, 1, device=device)
        vision = model.vision
        if pixels.shape[0] == 0:
            pixels = torch.zeros(0, 3, vision.image_size, vision.image_size, device=device)
        features = model.encode_images(pixels)
    else:
        features = torch.cat([f.to(device) for f in image_features])
    embeds = model.embed(ids, features)
    sampling = {"do_sample": options.do_sample}
    if options.do_sample:
        sampling.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or None)
    out = model.language_model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=options.max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        synced_gpus=synced_gpus,
        **sampling,
    )
    results = []
    for row in out.tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        results.append([t for t in row if t != pad_token_id])
    return results
