"""AnyRes tiles: the token count and the feature layout are transformers' LLaVA-NeXT's, and what cannot tile is refused.

Generation through a LLaVA-NeXT export in plain transformers is tested in
tests/model/test_pretrained.py; training with tiles in tests/training/test_anyres.py.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmtrain.image_tokens import AnyRes, parse_pinpoints, tile_grids
from mmtrain.model.anyres import pack_tiles
from mmtrain.model.errors import ConfigError

# (height, width): wide, tall, square, tiny, a long strip each way, odd sizes
SIZES = [(60, 150), (170, 50), (64, 64), (7, 9), (30, 400), (333, 41), (129, 127), (100, 300), (250, 90)]


@pytest.fixture(scope="module")
def tiled(model_folders):
    from mmtrain.args import ModelArguments
    from mmtrain.model import build_model

    args = ModelArguments(
        lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], anyres_max_tiles=6,
    )
    return build_model(args)


def test_each_image_takes_as_many_tokens_as_llava_next_s_processor_gives_it(tiled):
    from transformers import LlavaNextProcessor

    processor = LlavaNextProcessor(
        image_processor=tiled.image_processor.tiler, tokenizer=tiled.tokenizer, patch_size=8,
        vision_feature_select_strategy="full", image_token="<image>", num_additional_image_tokens=0,
    )
    anyres = tiled.image_tokens.anyres
    counts = []
    for height, width in SIZES:
        ids = processor(images=[Image.new("RGB", (width, height))], text="<image>")["input_ids"][0]
        counts.append(list(ids).count(tiled.image_tokens.image_id))
        assert counts[-1] == tiled.image_tokens.count((height, width)) == anyres.features((height, width)), (height, width)
        pixels = tiled.image_processor(images=[Image.new("RGB", (width, height))])["pixel_values"]
        assert pixels.shape == (anyres.tiles((height, width)), 3, 64, 64)
    assert len(set(counts)) >= 6  # the sizes really take different grids and cuts


def test_tile_features_are_laid_out_as_llava_next_lays_them_out():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextModel

    anyres = AnyRes(tile=32, side=4, pinpoints=tile_grids(6, 32))
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).to_dict(),
        text_config=LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32).to_dict(),
        image_grid_pinpoints=[list(p) for p in anyres.pinpoints],
    )
    reference = LlavaNextModel(config)
    sizes = torch.tensor([(h // 4, w // 4) for h, w in SIZES])  # sizes about one grid of these 32 px tiles
    tiles = [anyres.tiles(tuple(s)) for s in sizes.tolist()]
    torch.manual_seed(0)
    projected = torch.randn(sum(tiles), anyres.side * anyres.side, 16)
    newline = torch.randn(16)
    expected, lengths = reference.pack_image_features(list(projected.split(tiles)), sizes, "full", image_newline=newline)
    ours = pack_tiles(projected, sizes, anyres, newline)
    assert torch.equal(ours, torch.cat(expected))
    assert lengths.tolist() == [anyres.features(tuple(s)) for s in sizes.tolist()]
    assert len(set(tiles)) >= 3


def test_pinpoints_and_tile_budgets_read_as_grids():
    assert parse_pinpoints("672x336, 336x672") == ((672, 336), (336, 672))
    assert set(tile_grids(4, 10)) == {(10, 10), (10, 20), (20, 10), (20, 20), (10, 30), (30, 10), (10, 40), (40, 10)}
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_pinpoints("672,336")


@pytest.mark.parametrize(
    ("flags", "says", "fields"),
    [
        (dict(anyres_max_tiles=4, vis_proj="perceiver"), "the perceiver makes its own number of tokens", {"vis_proj"}),
        (dict(anyres_max_tiles=4, vision_keep_cls=True), "a CLS token is no patch", {"vision_keep_cls"}),
        (dict(anyres_max_tiles=4, image_grid_pinpoints="128x64"), "set one", {"anyres_max_tiles", "image_grid_pinpoints"}),
        (dict(image_grid_pinpoints="128 by 64"), "not HEIGHTxWIDTH", {"image_grid_pinpoints"}),
        (dict(anyres_max_tiles=-1), "must be >= 0", {"anyres_max_tiles"}),
    ],
)
def test_what_cannot_tile_is_refused_naming_the_fields(flags, says, fields):
    from mmtrain.model.config import VLMConfig

    with pytest.raises(ConfigError, match=says) as err:
        VLMConfig(**flags)
    assert fields <= set(err.value.fields)


def test_pinpoints_off_the_encoder_s_size_are_refused_before_any_weights(model_folders):
    from mmtrain.model.builder import check_model_config
    from mmtrain.model.config import VLMConfig

    config = VLMConfig(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=model_folders["tiny-clip"], image_grid_pinpoints="128x64,100x64")
    with pytest.raises(ConfigError, match=r"image_grid_pinpoints: 100x64 not a multiple of the encoder's image size 64"):
        check_model_config(config)


def test_a_tiled_model_reloads_from_its_export_and_computes_the_same(tiled, tmp_path):
    from mmtrain.data.dataset import pixel_inputs
    from mmtrain.data.template import encode_conversation
    from mmtrain.model.pretrained import load_pretrained, save_pretrained

    with torch.no_grad():
        tiled.model.projector.image_newline.normal_()
    save_pretrained(str(tmp_path / "export"), tiled.model.state_dict(), tiled.model, tiled.tokenizer, tiled.image_processor, tiled.config)
    reloaded = load_pretrained(str(tmp_path / "export"))
    images = [Image.new("RGB", (150, 60), "red"), Image.new("RGB", (50, 170), "blue")]
    turns = [{"role": "user", "text": "<image>\n<image>\nWhich?"}, {"role": "assistant", "text": "red"}]
    outs = []
    for built in (tiled, reloaded):
        ids = encode_conversation(turns, built.tokenizer, built.image_tokens, image_sizes=[(i.height, i.width) for i in images]).input_ids
        built.model.eval()
        with torch.no_grad():
            outs.append(built.model(input_ids=torch.tensor([ids]), return_logits=True, **pixel_inputs(images, built.image_processor, (3, 64, 64))).logits)
    assert torch.equal(*outs)
    assert reloaded.image_tokens.anyres == tiled.image_tokens.anyres
