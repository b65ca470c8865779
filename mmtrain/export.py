"""Export a trained model as transformers' own LLaVA (or LLaVA-NeXT), loadable without mmtrain.

    python -m mmtrain.export --model OUTPUT/epoch-N --format llava --out DIR
    python -m mmtrain.export --model OUTPUT/epoch-N --format llava_next --out DIR   # trained with AnyRes tiles

``DIR`` then loads with ``AutoModelForImageTextToText.from_pretrained(DIR)`` and
``AutoProcessor.from_pretrained(DIR)`` from plain transformers. A model trained with
AnyRes tiles (``--anyres_max_tiles`` / ``--image_grid_pinpoints``) is LLaVA-NeXT's
computation exactly: its folder holds the grids, the learned newline and the tiling
image processor training used; one without tiles is refused there, and the other way round.

Which projectors map exactly onto LLaVA's projector (Linear -> GELU -> Linear, with
biases):

* ``mlp``: exactly (same layers, same activation).
* ``baseline`` (Linear + LayerNorm): no. LLaVA has no LayerNorm after its projector
  and a LayerNorm cannot be folded into the following layer (it normalises each token
  by its own statistics), so the export would compute something else.
* ``vit`` and ``perceiver``: no. LLaVA has no transformer block or cross-attention
  resampler in its projector, and the perceiver changes the number of image tokens.

Vision towers: LLaVA calls its tower with ``pixel_values`` alone and reads one hidden
layer, dropping the first token ("default") or none ("full"). So a tower that needs more
inputs (SigLIP2's patch mask and grid), one with tokens besides the CLS token before its
patches (DINOv2's registers), and two fused towers (LLaVA holds one) are refused.

Videos (``--format llava_next_video``): LLaVA-NeXT-Video pools each frame's patch features
on the grid before its projector, as ``--video_pool`` does, and has its own video token,
as mmtrain's ``<video>``. Its image half is LLaVA-NeXT's, which always tiles, and its
processor gives a frame a square grid's patches // 4 tokens whatever the pooling stride:
so a model exports there when it was trained with AnyRes tiles and ``--video_pool 2`` on
an even square grid; other video models are refused with that reason (a video model has
no LLaVA or LLaVA-NeXT export, which could not read its videos). The processor's video
half is written as its settings file (its class needs torchvision to be built).

Models trained with MMCA attention export their weights, but LLaVA runs ordinary
causal attention, so the exported model would not compute what was trained: refused.

Prompts: the folder's chat template renders the prompt format the model was trained
with (the ``template`` and ``system_prompt`` recorded in the export): the bos token where
training put one, each image as ``<im_start><image><im_end>`` (the processor expands
``<image>`` into one token per patch; a model started from a LLaVA folder,
``--vlm_name_or_path``, keeps LLaVA's lone ``<image>``), and the ``plain`` template's
``### Image k:``, ``### Question:`` and ``### Answer:`` headers, or, for
``--template chat``, the tokenizer's own chat template (one that reads content parts,
such as a LLaVA folder's, is given the messages as they are). So in plain transformers::

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    model.generate(**inputs)

gives the tokens ``python -m mmtrain.generate --image IMAGE --prompt "What color is the shape?"``
gives (greedy, 64 new tokens by default; the generation config stops at the
tokenizer's eos). A content list is read as mmtrain reads such records (a newline
between an image and its neighbours); a content string is taken as it is, ``<image>``
where each image goes. The export checks that these prompts tokenise to the ids
training would have made and warns where a tokenizer makes them differ.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch

from mmtrain.args import ConfigError
from mmtrain.cli import FlagParser
from mmtrain.data.template import chat_template_takes_parts, encode_conversation
from mmtrain.generate import GenerateArguments
from mmtrain.image_tokens import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_TOKEN, VIDEO_PLACEHOLDER, VIDEO_TOKEN
from mmtrain.model.anyres import NEWLINE
from mmtrain.model.pretrained import export_config, load_pretrained, prompt_format, special_token_ids

EXPORTABLE_PROJECTORS = ("mlp",)
# What mmtrain.generate does unless told otherwise, so that a bare generate() agrees.
GENERATION_DEFAULTS = dict(do_sample=False, max_new_tokens=GenerateArguments.max_new_tokens)
IMAGE_MARKUP = IMAGE_START + IMAGE_TOKEN + IMAGE_END
VIDEO_MARKUP = IMAGE_START + VIDEO_TOKEN + IMAGE_END
# LLaVA-NeXT-Video's processor gives a frame (its patches) // 4 tokens, whatever the
# config's spatial_pool_stride: only 2 x 2 pooling counts as its model computes.
EXPORTABLE_VIDEO_POOL = 2


def _literal(text: str) -> str:
    """``text`` as a Jinja string literal (JSON's escapes are Python's, which Jinja reads)."""
    return json.dumps(text, ensure_ascii=False)


# A message's content as training saw it: text with a placeholder per image. A list of
# {"type": "image"} / {"type": "text"} parts (what transformers' processors take) is
# flattened as mmtrain.data.formats flattens such records, a newline between an image and
# what is next to it; so images before a question render as mmtrain.generate puts them.
# A string (placeholders included) is taken as it is.
_CONTENT_MACRO = (
    "{%- macro mm_text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}"
    "{%- set flat = namespace(text='') -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set piece = __PLACEHOLDER__ -%}"
    "{%- elif part['type'] == 'video' -%}{%- set piece = __VIDEO_PLACEHOLDER__ -%}"
    "{%- elif part['type'] == 'text' -%}{%- set piece = part['text'] -%}"
    "{%- else -%}{{- raise_exception('unknown content part type ' ~ part['type'] ~ ' (valid: text, image, video)') -}}"
    "{%- endif -%}"
    "{%- set marks = (__PLACEHOLDER__, __VIDEO_PLACEHOLDER__) -%}"
    "{%- if flat.text and not flat.text.endswith('\\n') and (piece in marks or flat.text.endswith(marks)) -%}"
    "{%- set flat.text = flat.text ~ '\\n' -%}"
    "{%- endif -%}"
    "{%- set flat.text = flat.text ~ piece -%}"
    "{%- endfor -%}"
    "{{- flat.text -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

# A record's own system turn wins over the recorded system prompt, as in training.
_SYSTEM = (
    "{%- set system = __SYSTEM__ -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = mm_text(messages[0]['content']) -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
)

# mmtrain.data.template's plain format, step for step (_encode_plain): leading images get
# their own "### Image k:" blocks before the question, later ones are set inside it, and
# every user turn ends with the answer header whether or not a generation prompt is asked.
_PLAIN_TEMPLATE = (
    _CONTENT_MACRO
    + _SYSTEM
    + "{%- set ns = namespace(images=0, videos=0, lead=0, leading=true) -%}"
    "{{- __BOS__ -}}"
    "{%- if system.strip() -%}{{- system.strip() ~ '\\n\\n' -}}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = mm_text(message['content']) -%}"
    # the kinds of the placeholders in order, then the text cut at every one of them
    "{%- set kinds = namespace(list=[]) -%}"
    "{%- for chunk in text.split(__PLACEHOLDER__) -%}"
    "{%- for _ in chunk.split(__VIDEO_PLACEHOLDER__)[1:] -%}{%- set kinds.list = kinds.list + ['video'] -%}{%- endfor -%}"
    "{%- if not loop.last -%}{%- set kinds.list = kinds.list + ['image'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set pieces = text.replace(__VIDEO_PLACEHOLDER__, __PLACEHOLDER__).split(__PLACEHOLDER__) -%}"
    "{%- set ns.lead = 0 -%}{%- set ns.leading = true -%}"
    "{%- for piece in pieces[:-1] -%}"
    "{%- if ns.leading and not piece.strip() -%}{%- set ns.lead = ns.lead + 1 -%}"
    "{%- else -%}{%- set ns.leading = false -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for kind in kinds.list[:ns.lead] -%}"
    "{%- if kind == 'image' -%}{%- set ns.images = ns.images + 1 -%}{{- '### Image ' ~ ns.images ~ ':\\n' ~ __IMAGE__ ~ '\\n\\n' -}}"
    "{%- else -%}{%- set ns.videos = ns.videos + 1 -%}{{- '### Video ' ~ ns.videos ~ ':\\n' ~ __VIDEO__ ~ '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set rest = pieces[ns.lead:] -%}"
    "{{- '### Question:\\n' ~ (rest[0].lstrip() if rest | length > 1 else rest[0].strip()) -}}"
    "{%- for piece in rest[1:] -%}"
    "{%- if kinds.list[ns.lead + loop.index0] == 'image' -%}"
    "{%- set ns.images = ns.images + 1 -%}{{- '\\n### Image ' ~ ns.images ~ ':\\n' ~ __IMAGE__ -}}"
    "{%- else -%}"
    "{%- set ns.videos = ns.videos + 1 -%}{{- '\\n### Video ' ~ ns.videos ~ ':\\n' ~ __VIDEO__ -}}"
    "{%- endif -%}"
    "{{- '\\n' ~ (piece.rstrip() if loop.last else piece) -}}"
    "{%- endfor -%}"
    "{{- '\\n\\n### Answer:\\n' -}}"
    "{%- else -%}"
    "{{- mm_text(message['content']).strip() ~ __EOS__ -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# --template chat: the tokenizer's own template renders the conversation with string
# contents (as _encode_chat gives it), then placeholders become image markup and the bos
# token goes in front if the template did not write it. The empty expressions keep
# trim_blocks/lstrip_blocks from eating whitespace at the edges of the embedded template.
_CHAT_WRAPPER = (
    _CONTENT_MACRO
    + _SYSTEM
    + "{%- set ns = namespace(turns=[]) -%}"
    "{%- if system.strip() -%}{%- set ns.turns = [{'role': 'system', 'content': system}] -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set ns.turns = ns.turns + [{'role': message['role'], 'content': mm_text(message['content'])}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.turns -%}"
    "{% set rendered %}{{ '' }}__TEMPLATE__{{ '' }}{% endset %}"
    "{%- set rendered = rendered.replace(__PLACEHOLDER__, __IMAGE__).replace(__VIDEO_PLACEHOLDER__, __VIDEO__) -%}"
    "__OUTPUT__"
)


# --template chat with a template that reads content parts (a VLM processor's own, such as
# a LLaVA folder's that the run started from): the messages go to it as they are, the
# recorded system prompt in front unless the conversation has its own; bos as above.
_PARTS_WRAPPER = (
    "{%- set system = __SYSTEM__ -%}"
    "{%- if system.strip() and not (messages and messages[0]['role'] == 'system') -%}"
    "{%- set messages = [{'role': 'system', 'content': [{'type': 'text', 'text': system}]}] + messages -%}"
    "{%- endif -%}"
    "{% set rendered %}{{ '' }}__TEMPLATE__{{ '' }}{% endset %}"
    "{%- set rendered = rendered.replace(__PLACEHOLDER__, __IMAGE__).replace(__VIDEO_PLACEHOLDER__, __VIDEO__) -%}"
    "__OUTPUT__"
)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts the bos token in front by itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def chat_template_for(tokenizer, template: str, system_prompt: str, markup: str = "mmtrain") -> str:
    """A chat template rendering the prompts ``encode_conversation`` makes for ``template``.

    ``markup`` is how the model reads an image (``ImageTokens.markup``): ``<im_start>``
    ``<image>`` ``<im_end>``, or LLaVA's ``<image>`` alone.

    Rendered text goes through ``processor(text=...)``, which tokenises it with the
    tokenizer's own special tokens; training put bos in front of every sample. So bos is
    written by the template exactly when the tokenizer does not add it itself, and both
    ``processor(text=apply_chat_template(...))`` and ``apply_chat_template(tokenize=True)``
    (which skips special tokens when the text starts with bos) get one bos.
    """
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None else ""
    adds_bos = tokenizer_adds_bos(tokenizer)
    values = {
        "__SYSTEM__": _literal(system_prompt),
        "__PLACEHOLDER__": _literal(IMAGE_PLACEHOLDER),
        "__IMAGE__": _literal(IMAGE_MARKUP if markup == "mmtrain" else IMAGE_TOKEN),
        "__VIDEO_PLACEHOLDER__": _literal(VIDEO_PLACEHOLDER),
        "__VIDEO__": _literal(VIDEO_MARKUP if markup == "mmtrain" else VIDEO_TOKEN),
    }
    own = ""
    if template == "plain":
        text = _PLAIN_TEMPLATE
        values.update({"__BOS__": _literal("" if adds_bos else bos), "__EOS__": _literal(tokenizer.eos_token)})
    elif template == "chat":
        own = tokenizer.chat_template
        if isinstance(own, dict):
            own = own.get("default")
        if not own:
            raise ConfigError("the export was trained with --template chat but its tokenizer has no chat template")
        if not bos:
            output = "{{- rendered -}}"
        elif adds_bos:
            output = "{{- rendered[" + str(len(bos)) + ":] if rendered.startswith(" + _literal(bos) + ") else rendered -}}"
        else:
            output = "{{- ('' if rendered.startswith(" + _literal(bos) + ") else " + _literal(bos) + ") ~ rendered -}}"
        text = (_PARTS_WRAPPER if chat_template_takes_parts(tokenizer) else _CHAT_WRAPPER).replace("__OUTPUT__", output)
    else:
        raise ConfigError(f"the export records template {template!r}, which this mmtrain cannot render")
    for key, value in values.items():
        text = text.replace(key, value)
    # last, so that nothing in the tokenizer's own template is taken for one of ours
    return text.replace("__TEMPLATE__", own)


# Conversations the export renders both ways and compares: one image, two, text only,
# and a second turn after an answer.
_CHECKED_CONVERSATIONS = {
    "one image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}],
    "two images": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which one is red?"}]}
    ],
    "text only": [{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}],
    "two turns": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it small?"}]},
    ],
}


def _as_turns(messages: list[dict]) -> list[dict]:
    """The same conversation as mmtrain's data reads it (placeholders in the text)."""
    from mmtrain.data.formats import _message_text

    return [{"role": m["role"], "text": _message_text(m["content"], "check", 0, t)} for t, m in enumerate(messages)]


def check_prompts(folder: str, built, template: str, system_prompt: str, processor_class=None) -> list[str]:
    """Where the exported processor's prompts differ from training's ids (empty: nowhere)."""
    from PIL import Image

    processor = (processor_class or _classes("llava")[2]).from_pretrained(folder)
    size = built.model.vision.image_size
    problems = []
    for name, messages in _CHECKED_CONVERSATIONS.items():
        # images of two shapes: with tiles, each gets its own grid and token count
        shapes = [(size * (1 + k % 2), size) for k in range(8)]
        count = sum(p["type"] == "image" for m in messages for p in m["content"])
        images = [Image.new("RGB", shapes[k]) for k in range(count)]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        got = processor(images=images or None, text=prompt)["input_ids"][0]
        expected = encode_conversation(
            _as_turns(messages), built.tokenizer, built.image_tokens, template=template, system_prompt=system_prompt,
            add_generation_prompt=True, image_sizes=[(im.height, im.width) for im in images],
        ).input_ids
        if list(got) != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            problems.append(f"{name}: token {at} is {list(got[at : at + 3])}, training has {expected[at : at + 3]}")
    if built.image_tokens.video_id is not None:
        problems += _check_video_prompt(processor, built, template, system_prompt)
    return problems


def _check_video_prompt(processor, built, template: str, system_prompt: str, frames: int = 3) -> list[str]:
    """The video prompt's ids against training's, its ``<video>`` expanded as LlavaNextVideoProcessor expands it.

    The processor's video half needs torchvision to run; its token count is one line
    (``replace_video_token``: a frame's patches // 4), done here on the rendered text.
    """
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    side = built.model.vision.image_size // built.model.vision.patch_size
    got = processor.tokenizer(prompt.replace(VIDEO_TOKEN, VIDEO_TOKEN * (side * side // 4 * frames)))["input_ids"]
    expected = encode_conversation(
        _as_turns(messages), built.tokenizer, built.image_tokens, template=template, system_prompt=system_prompt,
        add_generation_prompt=True, video_frames=[frames],
    ).input_ids
    if list(got) == expected:
        return []
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return [f"one video: token {at} is {list(got[at : at + 3])}, training has {expected[at : at + 3]}"]


def check_llava_vision(config, model_dir: str, anyres: bool = False) -> None:
    """Refuse (from configs alone) a vision encoder LLaVA's vision tower cannot be."""
    from mmtrain.model.vision import tower_specs

    specs = tower_specs(config)
    tile = specs[0].layout.pixel_shape[1]
    size = getattr(specs[0].config, "image_size", None)
    if anyres and size != tile:
        raise ConfigError(
            f"--model {model_dir}: its {type(specs[0].config).__name__} tower's config says image_size {size} but its image "
            f"processor gives {tile} px tiles; LLaVA-NeXT tiles by the config's image_size, so it would cut other tiles"
        )
    if len(specs) > 1:
        raise ConfigError(
            f"--model {model_dir} fuses two vision encoders; LlavaForConditionalGeneration holds one vision tower, "
            "so its features cannot be made there (the mmtrain export itself loads with mmtrain.model.load_pretrained)"
        )
    tower, layout = type(specs[0].config).__name__, specs[0].layout
    if layout.patchified:
        raise ConfigError(
            f"--model {model_dir}: its {tower} tower needs pixel_attention_mask and spatial_shapes beside the pixels, "
            "and LlavaForConditionalGeneration calls its vision tower with pixel_values alone"
        )
    if layout.prefix_tokens > 1:
        raise ConfigError(
            f"--model {model_dir}: its {tower} tower puts {layout.prefix_tokens} tokens before the patches "
            f"({layout.registers} registers), and LLaVA's feature selection drops at most one (the CLS token): "
            "they would become image tokens"
        )


def export_llava(model_dir: str, out: str, format: str = "llava") -> str:
    """Write ``model_dir`` (an mmtrain export) as a transformers LLaVA folder at ``out``: LLaVA, LLaVA-NeXT (AnyRes
    tiles) or LLaVA-NeXT-Video (AnyRes tiles and videos), as ``format`` names."""
    from transformers import GenerationConfig

    config, _ = export_config(model_dir)  # what the export is, read before any weights
    check_exportable(config, model_dir, format)
    template, system_prompt = prompt_format(model_dir)
    built = load_pretrained(model_dir)
    chat_template = chat_template_for(built.tokenizer, template, system_prompt, markup=built.image_tokens.markup)
    vlm = built.model
    vision_config = vlm.vision.tower.config
    has_cls = vlm.vision.has_cls
    # From the tokenizer, not the LM config: exports written before their configs
    # carried the tokenizer's ids export correctly too.
    token_ids = special_token_ids(built.tokenizer)
    text_config = {**vlm.language_model.config.to_dict(), **token_ids}
    decoder = vlm.language_model.get_decoder()
    table = _module_name(decoder, decoder.get_input_embeddings())
    untie = bool(text_config.get("tie_word_embeddings")) and table != LLAVA_TIED_TABLE
    if untie:
        # LLaVA ties its head to model.language_model.embed_tokens only: the head is written as a copy
        text_config["tie_word_embeddings"] = False
        warnings.warn(
            f"{out}: the LM ties its output head to its input table {table!r}, which transformers' LLaVA can tie only "
            f"when named {LLAVA_TIED_TABLE!r}; the head is written as an untied copy (the same numbers)",
            stacklevel=2,
        )
    common = dict(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        image_token_index=built.image_tokens.image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # the exported encoder already ends at the layer mmtrain read
        vision_feature_select_strategy="default" if (has_cls and vlm.vision.drop_cls) else "full",
        multimodal_projector_bias=True,
        **({"tie_word_embeddings": False} if untie else {}),
    )
    anyres = built.image_tokens.anyres
    model_class, config_class, processor_class = _classes(format)
    video = format == "llava_next_video"
    if video:  # frames pooled before the projector, as mmtrain.model.video pools them
        common.update(video_token_index=built.image_tokens.video_id, spatial_pool_mode="average", spatial_pool_stride=config.video_pool)
    if anyres is None:
        hf_config = config_class(**common, image_seq_length=built.image_tokens.per_image)
    else:
        hf_config = config_class(**common, image_grid_pinpoints=[list(p) for p in anyres.pinpoints])
    hf_config.vision_config.model_type = vision_config.model_type
    hf = model_class(hf_config).to(torch.float32)
    hf.model.vision_tower.load_state_dict(vlm.vision.tower.state_dict(), strict=True)
    projector = {k: v for k, v in vlm.projector.state_dict().items() if k != NEWLINE}
    hf.model.multi_modal_projector.load_state_dict(projector, strict=True)
    if anyres is not None:
        with torch.no_grad():
            hf.model.image_newline.copy_(getattr(vlm.projector, NEWLINE))
    # LLaVA holds the LM's decoder (model of LLaMA, gpt_neox of GPT-NeoX, ...) and its head apart.
    # The reloaded export's table already holds the new rows: its own rows stay out.
    body = {k: v for k, v in decoder.state_dict().items() if not k.endswith(".new_rows")}
    body = {(f"{table}.weight" if k == f"{table}.base.weight" else k): v for k, v in body.items()}
    hf.model.language_model.load_state_dict(body, strict=True)
    hf.lm_head.load_state_dict(vlm.language_model.get_output_embeddings().state_dict(), strict=True)
    hf.generation_config = GenerationConfig(**token_ids, **GENERATION_DEFAULTS)
    hf.save_pretrained(out)
    # A copy: the checks below encode with the tokenizer's own template, as training did.
    tokenizer = copy.deepcopy(built.tokenizer)
    tokenizer.chat_template = chat_template
    # LLaVA-NeXT-Video's processor is LLaVA-NeXT's plus a video half, whose class cannot be
    # built without torchvision: its image half is written, then named the video processor
    # with its video settings (write_video_processor).
    processor = (_classes("llava_next")[2] if video else processor_class)(
        # LLaVA-NeXT's processor tiles as training did: the very tiler mmtrain used
        image_processor=built.image_processor if anyres is None else built.image_processor.tiler,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=vlm.vision.prefix_tokens,
        chat_template=chat_template,
    )
    processor.save_pretrained(out)
    if video:
        write_video_processor(out, built.image_processor.tower_processor)
    # The video half of LLaVA-NeXT-Video's processor needs torchvision to load; its image half is LLaVA-NeXT's.
    problems = check_prompts(out, built, template, system_prompt, _classes("llava_next")[2] if video else processor_class)
    if problems:
        # Training tokenised the prompt piece by piece around each image and header; a
        # tokenizer that merges across those seams, or adds tokens of its own, gives other
        # ids for the same text. The folder still works, but not token for token.
        warnings.warn(
            f"{out}: prompts from processor.apply_chat_template tokenise differently from training, so generate() "
            "may not answer as mmtrain.generate does: " + "; ".join(problems),
            stacklevel=2,
        )
    return out


# What of the tower's image processor a video processor keeps: frames are resized,
# cropped and normalised as training's frames were (by that very processor).
_VIDEO_PROCESSOR_KEYS = (
    "do_resize", "size", "resample", "default_to_square", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)


def write_video_processor(out: str, tower_processor) -> None:
    """Make the LLaVA-NeXT processor saved at ``out`` LLaVA-NeXT-Video's: its files name that class and its
    ``<video>`` token, and ``video_preprocessor_config.json`` sets LlavaNextVideoVideoProcessor up as the tower's
    processor handles training's frames.

    Written as files rather than by building the classes: transformers' video processors
    need torchvision, which a CPU install may lack; the folder's users load it with theirs.
    """
    import os

    from transformers.utils import VIDEO_PROCESSOR_NAME

    settings = {k: v for k, v in tower_processor.to_dict().items() if k in _VIDEO_PROCESSOR_KEYS and v is not None}
    settings.update(video_processor_type="LlavaNextVideoVideoProcessor", processor_class="LlavaNextVideoProcessor", do_sample_frames=False)
    with open(os.path.join(out, VIDEO_PROCESSOR_NAME), "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            values = json.load(f)
        if name == "processor_config.json":  # transformers 5 keeps the sub-processors' settings here too
            values.update(video_token=VIDEO_TOKEN, video_processor=settings)
        if name == "processor_config.json" or "processor_class" in values:
            values["processor_class"] = "LlavaNextVideoProcessor"
        with open(path, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True)


def _classes(format: str):
    """(model, config, processor) classes of transformers that ``format`` writes."""
    import transformers

    names = FORMATS[format]
    return tuple(getattr(transformers, name) for name in names)


# --format: the transformers classes written, (model, config, processor).
FORMATS = {
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig", "LlavaProcessor"),
    "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextConfig", "LlavaNextProcessor"),
    "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoConfig", "LlavaNextVideoProcessor"),
}


def check_exportable(config, model_dir: str, format: str) -> None:
    """Refuse (from the export's config alone) what the ``format``'s transformers class cannot compute."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r}: valid are {', '.join(FORMATS)}")
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
    if config.video_pool and format != "llava_next_video":
        raise ConfigError(
            f"--model {model_dir} reads videos (video_pool {config.video_pool}), which {FORMATS[format][0]} cannot: "
            "use --format llava_next_video (for a model trained with AnyRes tiles and video_pool 2)"
        )
    if format == "llava_next_video":
        _check_video_export(config, model_dir)
    if config.anyres and format == "llava":
        raise ConfigError(
            f"--model {model_dir} encodes images as AnyRes tiles, which LlavaForConditionalGeneration cannot lay out: "
            "use --format llava_next"
        )
    if not config.anyres and format != "llava":
        raise ConfigError(
            f"--model {model_dir} encodes each image as one fixed square (no image_grid_pinpoints or anyres_max_tiles); "
            f"{FORMATS[format][0]} always tiles images: use --format llava"
            + (", which holds no videos (a model for LLaVA-NeXT-Video trains with AnyRes tiles)" if config.video_pool else "")
        )
    check_llava_vision(config, model_dir, anyres=config.anyres)
    if format == "llava_next_video":
        from mmtrain.model.vision import tower_specs

        rows, cols = tower_specs(config)[0].layout.grid
        if rows != cols or rows % 2:
            raise ConfigError(
                f"--model {model_dir}: its {rows}x{cols} patch grid pools to ({rows} // 2) x ({cols} // 2) cells a frame, and "
                "LlavaNextVideoProcessor counts a square grid's patches // 4 per frame: the spans would differ"
            )


def _check_video_export(config, model_dir: str) -> None:
    """What LlavaNextVideoForConditionalGeneration needs of a video model, from its config alone."""
    if not config.video_pool:
        raise ConfigError(f"--model {model_dir} reads no videos (video_pool 0): use --format llava_next (AnyRes tiles) or llava")
    if config.video_pool != EXPORTABLE_VIDEO_POOL:
        raise ConfigError(
            f"--model {model_dir} pools video frames {config.video_pool} x {config.video_pool}; LlavaNextVideoProcessor always "
            f"gives a frame its patches // 4 tokens, which is video_pool {EXPORTABLE_VIDEO_POOL} only"
        )


# The name of the LM's input table that LlavaForConditionalGeneration ties its head to.
LLAVA_TIED_TABLE = "embed_tokens"


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "An mmtrain export folder (OUTPUT/epoch-N)."})
    out: str = field(metadata={"help": "The folder to write."})
    format: Literal["llava", "llava_next", "llava_next_video"] = field(
        default="llava",
        metadata={
            "help": "The model class to write: transformers' LLaVA, LLaVA-NeXT for a model trained with AnyRes tiles, or "
            "LLaVA-NeXT-Video for one trained with AnyRes tiles and --video_pool 2."
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(ExportArguments, prog="python -m mmtrain.export", description=__doc__.split("\n\n")[0], epilog=__doc__)
    (args,) = parser.parse(argv)
    try:
        export_llava(args.model, args.out, args.format)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)  # an export's own config is what failed: its fields, not flags, are named
        return 2
    print(f"wrote {args.out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The console script's entry point: the exit status (0 done, 2 a bad flag or input)."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
