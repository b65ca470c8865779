"""Architecture presets: named model shapes that build locally with random weights.

Where a model path is expected, a preset name builds the architecture from a config
alone (no download). A preset is materialised as an ordinary Hugging Face folder
(`config.json`, weights, tokenizer or image processor) by :func:`materialize_preset`,
so presets and a user's checkpoint go through the very same ``from_pretrained`` code.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable

from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Siglip2VisionConfig,
    SiglipVisionConfig,
    ViTConfig,
)


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "vision" or "language"
    build_config: Callable[[], PretrainedConfig]
    description: str


# The ids of the presets' tokenizer (see build_preset_tokenizer: its special tokens come
# first). A config's own defaults (LLaMA's bos 1, eos 2) would name other tokens, and
# everything that reads the config (``generate()``, an export) would stop at the wrong
# one. No pad id: it would make the embedding zero that row at initialisation, changing
# the preset's weights; padding is masked anyway, and exports record the pad id.
_PRESET_TOKEN_IDS = dict(bos_token_id=0, eos_token_id=1)

# The tiny language models share one shape so tests can swap the architecture alone.
_TINY_LM_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def _tiny_llama() -> LlamaConfig:
    return LlamaConfig(vocab_size=PRESET_TOKENIZER_VOCAB, rms_norm_eps=1e-5, **_TINY_LM_SHAPE, **_PRESET_TOKEN_IDS)


def _tiny_qwen2() -> Qwen2Config:
    return Qwen2Config(vocab_size=PRESET_TOKENIZER_VOCAB, **_TINY_LM_SHAPE, **_PRESET_TOKEN_IDS)


def _llama_2(hidden: int, layers: int, heads: int, mlp: int) -> Callable[[], LlamaConfig]:
    def build() -> LlamaConfig:
        return LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **_PRESET_TOKEN_IDS,
        )

    return build


# The tiny vision towers share one shape, like the tiny LMs.
_TINY_VISION_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
)


def _tiny_clip() -> CLIPVisionConfig:
    return CLIPVisionConfig(projection_dim=64, **_TINY_VISION_SHAPE)


def _tiny_siglip() -> SiglipVisionConfig:
    return SiglipVisionConfig(**_TINY_VISION_SHAPE)


def _tiny_siglip2() -> Siglip2VisionConfig:
    # No image_size: SigLIP2 reads a fixed grid of sqrt(num_patches) patches a side (8 x 8 = 64 px here).
    shape = {k: v for k, v in _TINY_VISION_SHAPE.items() if k != "image_size"}
    return Siglip2VisionConfig(num_patches=64, **shape)


def _tiny_dinov2() -> Dinov2Config:
    shape = {k: v for k, v in _TINY_VISION_SHAPE.items() if k != "intermediate_size"}
    return Dinov2Config(mlp_ratio=2, **shape)


def _tiny_dinov2_registers() -> Dinov2WithRegistersConfig:
    shape = {k: v for k, v in _TINY_VISION_SHAPE.items() if k != "intermediate_size"}
    return Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **shape)


def _tiny_vit() -> ViTConfig:
    return ViTConfig(**_TINY_VISION_SHAPE)


def _dinov2_large_224() -> Dinov2Config:
    # DINOv2 ViT-L/14 as its image processor runs it: 224 px crops, 16 x 16 patches
    return Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14)


def _siglip_so400m_224() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=224, patch_size=14
    )


def _clip(hidden: int, layers: int, heads: int, mlp: int, image: int, patch: int, proj: int):
    def build() -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image,
            patch_size=patch,
            projection_dim=proj,
            hidden_act="quick_gelu" if hidden == 1024 else "gelu",
        )

    return build


# Size of the byte-level BPE vocabulary the presets' tokenizer is trained to.
PRESET_TOKENIZER_VOCAB = 1024

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-llama", "language", _tiny_llama, "LlamaForCausalLM, 4 layers, hidden 128 (tests, CPU demo)"),
        Preset("tiny-qwen2", "language", _tiny_qwen2, "Qwen2ForCausalLM, 4 layers, hidden 128 (tests)"),
        Preset("llama-2-7b", "language", _llama_2(4096, 32, 32, 11008), "LLaMA-2-7B shape (6.74 B)"),
        Preset("llama-2-13b", "language", _llama_2(5120, 40, 40, 13824), "LLaMA-2-13B shape (13.0 B)"),
        Preset("tiny-clip", "vision", _tiny_clip, "CLIP vision tower, 3 layers, 64 px, patch 8 (tests, CPU demo)"),
        Preset("tiny-siglip", "vision", _tiny_siglip, "SigLIP vision tower, 3 layers, 64 px, patch 8 (tests)"),
        Preset("tiny-siglip2", "vision", _tiny_siglip2, "SigLIP2 vision tower at a fixed 8x8 grid, 3 layers, 64 px, patch 8 (tests)"),
        Preset("tiny-dinov2", "vision", _tiny_dinov2, "DINOv2 tower (CLS), 3 layers, 64 px, patch 8 (tests)"),
        Preset("tiny-dinov2-registers", "vision", _tiny_dinov2_registers, "DINOv2 with 4 registers (+ CLS), 3 layers, 64 px, patch 8 (tests)"),
        Preset("tiny-vit", "vision", _tiny_vit, "ViT tower (CLS), 3 layers, 64 px, patch 8: the generic path (tests)"),
        Preset("dinov2-large-224", "vision", _dinov2_large_224, "DINOv2 ViT-L/14 at 224 px, 256 patches (0.30 B)"),
        Preset("siglip-so400m-14-224", "vision", _siglip_so400m_224, "SigLIP So400m/14 at 224 px, 256 patches (0.43 B)"),
        Preset(
            "clip-vit-large-patch14-336",
            "vision",
            _clip(1024, 24, 16, 4096, 336, 14, 768),
            "CLIP ViT-L/14 at 336 px, 576 patches (0.30 B)",
        ),
        Preset(
            "clip-vit-bigG-14",
            "vision",
            _clip(1664, 48, 16, 8192, 224, 14, 1280),
            "CLIP ViT-bigG/14 at 224 px, 256 patches (1.84 B)",
        ),
    ]
}


def preset_names(kind: str) -> list[str]:
    return sorted(name for name, p in PRESETS.items() if p.kind == kind)


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_config(name: str) -> PretrainedConfig:
    return PRESETS[name].build_config()


@contextlib.contextmanager
def seeded_init(seed: int, device: torch.device | None = None):
    """Draw a preset's random weights from ``seed``, on ``device`` (default: the CPU).

    Every process draws the same weights from the same seed, and the caller's random
    state is left as it was. On a GPU a 7B preset initialises in seconds; on the CPU,
    with the one thread per process a launcher sets, it took minutes.
    """
    import torch

    on_gpu = device is not None and torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if on_gpu else []):
        torch.manual_seed(seed)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield


# A small English corpus the presets' tokenizer is trained on. Byte-level BPE falls
# back to bytes for anything else, so every string still tokenizes.
_CORPUS_WORDS = (
    "the a an is are what which how many where image images picture shape shapes color colour "
    "red green blue yellow purple orange white black gray circle square triangle small large big "
    "left right top bottom center middle one two three four five six zero more fewer same first second "
    "there in on of and or to does do has have answer question yes no both neither count object objects "
    "### Image Question Answer System User Assistant you are a helpful assistant that looks at images"
)


def build_preset_tokenizer():
    """A deterministic byte-level BPE tokenizer for presets (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: what _PRESET_TOKEN_IDS says
    trainer = trainers.BpeTrainer(
        vocab_size=PRESET_TOKENIZER_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [_CORPUS_WORDS] + [f"{w} " * 3 for w in _CORPUS_WORDS.split()]
    lines += [f"{c}\n" for c in "0123456789?:.,!"]
    tok.train_from_iterator(lines * 8, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    tokenizer.chat_template = PRESET_CHAT_TEMPLATE
    return tokenizer


# A chat template for the presets' tokenizer, so ``--template chat`` runs on them as on a
# real chat model: role headers in words the tokenizer knows, each assistant turn closed
# by the end-of-sequence token (which training then teaches the model to emit).
PRESET_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}<s>{% endif %}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def build_preset_image_processor(config: PretrainedConfig):
    # The PIL-backed processors: torchvision, which the default backend wants, has no
    # CPU build on every platform.
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:  # older transformers: the default classes are PIL-backed
        from transformers import CLIPImageProcessor, SiglipImageProcessor

    if isinstance(config, Siglip2VisionConfig):
        size = math.isqrt(config.num_patches) * config.patch_size
        return SiglipImageProcessor(size={"height": size, "width": size})
    size = config.image_size
    if isinstance(config, SiglipVisionConfig):
        return SiglipImageProcessor(size={"height": size, "width": size})
    if isinstance(config, (Dinov2Config, Dinov2WithRegistersConfig)):
        from transformers import BitImageProcessorPil

        # DINOv2's own processing (ImageNet statistics), at the preset's size
        return BitImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
        )
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def materialize_preset(name: str, folder: str | os.PathLike, seed: int = 0) -> str:
    """Write preset ``name`` with random weights to ``folder`` as a Hugging Face folder.

    Returns the folder. Existing folders holding the same preset are reused.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    folder = os.fspath(folder)
    marker = os.path.join(folder, "mmtrain_preset.txt")
    if os.path.exists(marker) and open(marker).read().strip() == f"{name} seed={seed}":
        return folder
    preset = PRESETS[name]
    config = preset.build_config()
    torch.manual_seed(seed)
    if preset.kind == "language":
        model = AutoModelForCausalLM.from_config(config)
        build_preset_tokenizer().save_pretrained(folder)
    else:
        model = AutoModel.from_config(config)
        build_preset_image_processor(config).save_pretrained(folder)
    model.save_pretrained(folder)
    with open(marker, "w") as f:
        f.write(f"{name} seed={seed}\n")
    return folder
