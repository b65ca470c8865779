"""Tiny transformers LLaVA folders (the llava-hf layout), written with transformers itself.

What a user holds after downloading a LLaVA-1.5 checkpoint, at test size: a
``LlavaForConditionalGeneration`` saved with ``save_pretrained``, its tokenizer with the
``<image>`` token, and a ``LlavaProcessor`` with a LLaVA-1.5-style chat template (content
parts, ``USER:``/``ASSISTANT:``), saved beside it.
"""

from __future__ import annotations

import os

# LLaVA-1.5's prompt shape; the bos token written by the template (the tiny tokenizer does
# not add one), each answer closed by eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}\n"
    "{% else %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def write_tiny_llava(folder, *, vision: str = "tiny-clip", strategy: str = "default", feature_layer: int = -2, seed: int = 0) -> str:
    """Write a tiny random LLaVA folder (CLIP or SigLIP tower, LLaMA LM) and return its path."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mmtrain import presets

    folder = os.fspath(folder)
    tokenizer = presets.build_preset_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision_config = presets.preset_config(vision)
    text_config = presets.preset_config("tiny-llama")
    text_config.vocab_size = len(tokenizer) + 5  # a table padded past the tokenizer, as LLaVA-1.5's 32064 rows
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(text_config, key, getattr(tokenizer, key))
    has_cls = vision != "tiny-siglip"
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=patches + (1 if has_cls and strategy == "full" else 0),
    )
    config.vision_config.model_type = vision_config.model_type
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # biases and norms away from their zero/one start, so that every tensor matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=presets.build_preset_image_processor(vision_config),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        image_token="<image>",
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def write_tiny_llava_next(folder, *, seed: int = 0, pinpoints=((64, 128), (128, 64), (128, 128), (64, 192))) -> str:
    """Write a tiny random LLaVA-NeXT folder (CLIP tower of 64 px tiles, LLaMA LM, its grids and newline) and return its path."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    from mmtrain import presets

    folder = os.fspath(folder)
    tokenizer = presets.build_preset_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    vision_config = presets.preset_config("tiny-clip")
    text_config = presets.preset_config("tiny-llama")
    text_config.vocab_size = len(tokenizer) + 5
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(text_config, key, getattr(tokenizer, key))
    config = LlavaNextConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=[list(p) for p in pinpoints],
    )
    config.vision_config.model_type = vision_config.model_type
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder)
    size = vision_config.image_size
    tiler = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_grid_pinpoints=[list(p) for p in pinpoints],
    )
    processor = LlavaNextProcessor(
        image_processor=tiler, tokenizer=tokenizer, patch_size=vision_config.patch_size, vision_feature_select_strategy="default",
        image_token="<image>", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


# Plain transformers, no mmtrain: each folder's own processor and chat template make the
# prompt and greedy generate() answers (kept from stopping for 8 tokens); the ids and
# answers are written to a JSON file, the pixels and the prompt's logits beside each folder.
GENERATE_SCRIPT = """
import json, sys
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

out_path, device, folders = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {}
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 72, 3), dtype=np.uint8))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
for folder in folders:
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        logits = model(**inputs).logits[0]
    torch.save({"pixel_values": inputs["pixel_values"].cpu(), "logits": logits.cpu()}, folder + ".outputs.pt")
    out[folder] = {"input_ids": inputs["input_ids"][0].tolist(), "new": ids[0, inputs["input_ids"].shape[1]:].tolist()}
assert not any(name.startswith("mmtrain") for name in sys.modules), "mmtrain was imported"
json.dump(out, open(out_path, "w"))
"""


def plain_transformers_generate(tmp_path, *folders, device: str = "cpu") -> dict:
    """``{folder: {"input_ids", "new"}}`` from GENERATE_SCRIPT, run in a process of its own outside the repository."""
    import json
    import subprocess
    import sys

    script = tmp_path / "generate_plain.py"
    script.write_text(GENERATE_SCRIPT)
    out = tmp_path / "generated.json"
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if device != "cpu":  # the GPU's libraries are found through the environment
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), device, *map(str, folders)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())
