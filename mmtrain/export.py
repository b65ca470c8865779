"""Export a trained model as transformers' own LLaVA, loadable without mmtrain.

    python -m mmtrain.export --model OUTPUT/epoch-N --format llava --out DIR

``DIR`` then loads with ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)`` from plain transformers.

Which projectors map exactly onto LLaVA's projector (Linear -> GELU -> Linear, with
biases):

* ``mlp``: exactly (same layers, same activation).
* ``baseline`` (Linear + LayerNorm): no. LLaVA has no LayerNorm after its projector
  and a LayerNorm cannot be folded into the following layer (it normalises each token
  by its own statistics), so the export would compute something else.
* ``vit`` and ``perceiver``: no. LLaVA has no transformer block or cross-attention
  resampler in its projector, and the perceiver changes the number of image tokens.

Models trained with MMCA attention export their weights, but LLaVA runs ordinary
causal attention, so the exported model would not compute what was trained: refused.

Prompts: write each image as ``<im_start><image><im_end>`` in the text (the processor
expands ``<image>`` into one token per patch), in the training template, e.g.
``### Image 1:\\n<im_start><image><im_end>\\n\\n### Question:\\nWhat color is the shape?\\n\\n### Answer:\\n``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmtrain import compat
from mmtrain.args import ConfigError
from mmtrain.cli import FlagParser
from mmtrain.model.pretrained import export_config, load_pretrained

EXPORTABLE_PROJECTORS = ("mlp",)


def export_llava(model_dir: str, out: str) -> str:
    """Write ``model_dir`` (an mmtrain export) as a transformers LLaVA folder at ``out``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config, _ = export_config(model_dir)  # what the export is, read before any weights
    if config.vis_proj not in EXPORTABLE_PROJECTORS:
        raise ConfigError(
            f"--model {model_dir}: the {config.vis_proj!r} projector has no exact LLaVA equivalent "
            f"(exportable: {', '.join(EXPORTABLE_PROJECTORS)}); see `python -m mmtrain.export --help`"
        )
    if config.enable_mmca_attention:
        raise ConfigError(
            f"--model {model_dir} was trained with MMCA attention ({config.mmca_image_attention}), which LLaVA's "
            "ordinary causal attention cannot run: the export would compute something else"
        )
    built = load_pretrained(model_dir)
    vlm = built.model
    vision_config = vlm.vision.tower.config
    has_cls = vlm.vision.has_cls
    text_config = vlm.language_model.config
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=built.image_tokens.image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # the exported encoder already ends at the layer mmtrain read
        vision_feature_select_strategy="default" if (has_cls and vlm.vision.drop_cls) else "full",
        image_seq_length=built.image_tokens.per_image,
        multimodal_projector_bias=True,
    )
    config.vision_config.model_type = vision_config.model_type
    llava = LlavaForConditionalGeneration(config).to(torch.float32)
    llava.model.vision_tower.load_state_dict(vlm.vision.tower.state_dict(), strict=True)
    llava.model.multi_modal_projector.load_state_dict(vlm.projector.state_dict(), strict=True)
    lm_state = vlm.language_model.state_dict()
    body = {k[len("model.") :]: v for k, v in lm_state.items() if k.startswith("model.")}
    body = {k.replace("embed_tokens.base.weight", "embed_tokens.weight"): v for k, v in body.items() if not k.endswith("new_rows")}
    llava.model.language_model.load_state_dict(body, strict=True)
    llava.lm_head.load_state_dict({"weight": lm_state["lm_head.weight"]}, strict=True)
    llava.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=built.image_processor,
        tokenizer=built.tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token="<image>",
        num_additional_image_tokens=1 if has_cls else 0,
    )
    processor.save_pretrained(out)
    return out


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "An mmtrain export folder (OUTPUT/epoch-N)."})
    out: str = field(metadata={"help": "The folder to write."})
    format: Literal["llava"] = field(default="llava", metadata={"help": "The model class to write: transformers' LLaVA."})


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(ExportArguments, prog="python -m mmtrain.export", description=__doc__.split("\n\n")[0], epilog=__doc__)
    (args,) = parser.parse(argv)
    try:
        export_llava(args.model, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
