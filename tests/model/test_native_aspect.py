"""Native aspect ratio (SigLIP2 NaFlex, --vision_max_patches): each image at its own patch grid, as SigLIP2's own processor and tower read it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmtrain.model.errors import ConfigError

# (width, height): wide, tall, square, tiny, a long strip
SHAPES = [(150, 40), (30, 100), (64, 64), (5, 7), (400, 20)]


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    """A tiny SigLIP2 tower folder with its NaFlex processor."""
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionModel

    from mmtrain import presets

    folder = tmp_path_factory.mktemp("siglip2")
    torch.manual_seed(0)
    Siglip2VisionModel(presets.preset_config("tiny-siglip2")).save_pretrained(folder)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=64).save_pretrained(folder)
    return str(folder)


def _built(model_folders, vision, **kw):
    from mmtrain.args import ModelArguments
    from mmtrain.model import build_model

    return build_model(ModelArguments(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=vision, lang_lora_dim=0, **kw))


def _images():
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in SHAPES]


def test_each_image_is_read_at_its_own_grid_as_siglip2_reads_it(model_folders, siglip2):
    from transformers import Siglip2ImageProcessorPil

    from mmtrain.data.dataset import pixel_inputs

    built = _built(model_folders, siglip2, vision_max_patches=48)
    images = _images()
    theirs = Siglip2ImageProcessorPil.from_pretrained(siglip2)(images=images, max_num_patches=48, return_tensors="pt")
    counts = [built.image_tokens.count((im.height, im.width)) for im in images]
    assert counts == (theirs["spatial_shapes"][:, 0] * theirs["spatial_shapes"][:, 1]).tolist()
    assert len(set(theirs["spatial_shapes"].tolist()[i][0] for i in range(len(images)))) >= 4  # grids of their own shapes
    ours = pixel_inputs(images, built.image_processor, (3, 1, 1))
    features = built.model.encode_images(ours["pixel_values"], ours["image_sizes"])
    reference = built.model.vision.tower(**theirs, output_hidden_states=True).hidden_states[-1]
    mask = theirs["pixel_attention_mask"].bool()
    torch.testing.assert_close(features[mask], reference[mask])
    positions = built.model.image_positions(features, ours["image_sizes"])
    torch.testing.assert_close(positions, built.model.projector(reference[mask]))
    assert positions.shape[0] == sum(counts)


def test_a_native_aspect_model_trains_and_reloads_from_its_export(model_folders, tmp_path):
    """On the tiny-siglip2 preset: a batch of mixed shapes trains; the export reloads with the NaFlex processor and the same logits."""
    from mmtrain.data.collator import Collator
    from mmtrain.data.dataset import image_shape, pixel_inputs
    from mmtrain.data.template import encode_conversation
    from mmtrain.model.pretrained import load_pretrained, save_pretrained

    built = _built(model_folders, "tiny-siglip2", vision_max_patches=40, vis_lora_dim=2)
    images = _images()[:3]
    turns = [{"role": "user", "text": "<image>\n<image>\n<image>\nWhich?"}, {"role": "assistant", "text": "the first"}]
    sizes = [(im.height, im.width) for im in images]

    def item(b):
        ids = encode_conversation(turns, b.tokenizer, b.image_tokens, image_sizes=sizes)
        return {"input_ids": torch.tensor(ids.input_ids), "labels": torch.tensor(ids.labels), **pixel_inputs(images, b.image_processor, (3, 1, 1))}

    empty = image_shape(built.image_processor)  # what a text-only item's pixels look like: no rows of patch rows
    text_only = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6]), **pixel_inputs([], built.image_processor, empty)}
    batch = Collator(built.tokenizer.pad_token_id)([item(built), text_only])
    loss = built.model(**batch).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in built.model.named_parameters() if "vision" in n and "lora" in n)
    save_pretrained(str(tmp_path / "export"), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, built.config)
    reloaded = load_pretrained(str(tmp_path / "export"))
    assert reloaded.image_tokens.native == built.image_tokens.native
    outs = []
    for b in (built, reloaded):
        b.model.eval()
        with torch.no_grad():
            outs.append(b.model(**Collator(b.tokenizer.pad_token_id)([item(b)]), return_logits=True).logits)
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (dict(vision_max_patches=48, anyres_max_tiles=4), "pick one"),
        (dict(vision_max_patches=48, vis_proj="perceiver"), "token by token"),
        (dict(vision_max_patches=-1), "must be >= 0"),
    ],
)
def test_what_cannot_read_native_aspect_ratios_is_refused(flags, says):
    from mmtrain.model.config import VLMConfig

    with pytest.raises(ConfigError, match=says) as err:
        VLMConfig(vision_model_name_or_path="tiny-siglip2", **flags)
    assert "vision_max_patches" in err.value.fields


def test_a_fixed_size_tower_and_the_feature_cache_are_refused_before_weights_load(model_folders):
    from mmtrain.args import parse_args
    from mmtrain.model.builder import check_model_config
    from mmtrain.model.config import VLMConfig

    with pytest.raises(ConfigError, match="reads one fixed image size; native aspect ratios need a tower that takes patch rows"):
        check_model_config(VLMConfig(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], vision_max_patches=48))
    with pytest.raises(ConfigError, match="--cache_vision_features keeps one fixed-size feature block per image"):
        parse_args(["--vision_model_name_or_path", "tiny-siglip2", "--vision_max_patches", "48", "--cache_vision_features", "true"])
