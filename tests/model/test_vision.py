"""Vision towers beyond CLIP/SigLIP, and two fused: layouts, training, exports, refusals, costs.

Every tower is a tiny random model written with ``save_pretrained`` and read back
through ``from_pretrained``, as a user's checkpoint would be.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmtrain import presets
from mmtrain.model.errors import ConfigError

from ..conftest import reset_accelerate_state
from ..training.conftest import common_flags, train_losses


@pytest.fixture(scope="module")
def towers(tmp_path_factory, model_folders):
    """``{kind: folder}``: SigLIP2 with its own (NaFlex) processor, DINOv2 with and without registers, ViT, SigLIP."""
    from transformers import Siglip2ImageProcessorPil, Siglip2VisionModel

    root = tmp_path_factory.mktemp("towers")
    folders = {name: presets.materialize_preset(f"tiny-{name}", root / name) for name in ("dinov2", "dinov2-registers", "vit")}
    torch.manual_seed(0)
    siglip2 = root / "siglip2"
    Siglip2VisionModel(presets.preset_config("tiny-siglip2")).save_pretrained(siglip2)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=64).save_pretrained(siglip2)
    folders["siglip2"] = str(siglip2)
    folders["siglip"] = model_folders["tiny-siglip"]
    return folders


def _args(model_folders, vision, vision_2=None, **kw):
    from mmtrain.args import ModelArguments

    values = dict(lm_model_name_or_path=model_folders["tiny-llama"], vision_model_name_or_path=vision, lang_lora_dim=0)
    return ModelArguments(**{**values, "vision_model_name_or_path_2": vision_2, **kw})


def _images(n=3):
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40 + 8 * i, 56, 3, generator=g) * 255).to(torch.uint8).numpy()) for i in range(n)]


@pytest.mark.parametrize(
    ("kind", "prefix", "registers"),
    [("siglip2", 0, 0), ("dinov2", 1, 0), ("dinov2-registers", 5, 4), ("vit", 1, 0), ("siglip", 0, 0)],
)
def test_leading_tokens_are_counted_and_only_patches_reach_the_projector(towers, model_folders, kind, prefix, registers):
    from mmtrain.model import build_model

    built = build_model(_args(model_folders, towers[kind]))
    vision = built.model.vision
    assert (vision.layout.prefix_tokens, vision.layout.registers) == (prefix, registers)
    assert vision.num_patches == built.image_tokens.per_image == 64  # an 8 x 8 grid, whatever came before it
    pixels = built.image_processor(images=_images(), return_tensors="pt")["pixel_values"]
    features = built.model.encode_images(pixels)
    assert features.shape == (3, 64, vision.hidden_size)
    if not vision.layout.patchified:
        out = vision.tower(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(features, out.hidden_states[-1][:, prefix:])


def test_keep_cls_keeps_the_cls_token_and_drops_the_registers(towers, model_folders):
    from mmtrain.model import build_model

    built = build_model(_args(model_folders, towers["dinov2-registers"], vision_keep_cls=True))
    vision = built.model.vision
    assert vision.num_patches == built.image_tokens.per_image == 65
    pixels = built.image_processor(images=_images(1), return_tensors="pt")["pixel_values"]
    states = vision.tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(built.model.encode_images(pixels), torch.cat([states[:, :1], states[:, 5:]], dim=1))


def test_siglip2_at_a_fixed_grid_sees_what_its_own_processor_makes(towers, model_folders):
    """Patch rows made here equal the NaFlex processor's for an image already at the grid's size."""
    from transformers import Siglip2ImageProcessorPil

    from mmtrain.model import build_model

    built = build_model(_args(model_folders, towers["siglip2"]))
    image = _images(1)[0].resize((64, 64))
    naflex = Siglip2ImageProcessorPil.from_pretrained(towers["siglip2"])(images=[image], return_tensors="pt")
    assert naflex["spatial_shapes"].tolist() == [[8, 8]] and bool(naflex["pixel_attention_mask"].all())
    pixels = built.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    vision = built.model.vision
    inputs = vision._inputs(pixels)
    torch.testing.assert_close(inputs["pixel_values"], naflex["pixel_values"])
    theirs = vision.tower(**naflex, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(built.model.encode_images(pixels), theirs)


def test_fused_features_are_each_towers_own_concatenated(towers, model_folders):
    from mmtrain.model import build_model

    fused = build_model(_args(model_folders, towers["dinov2"], towers["siglip"]))
    alone = [build_model(_args(model_folders, towers[k])) for k in ("dinov2", "siglip")]
    images = _images()
    pixels = fused.image_processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 6, 64, 64) and fused.image_tokens.per_image == 64
    expected = torch.cat(
        [b.model.encode_images(b.image_processor(images=images, return_tensors="pt")["pixel_values"]) for b in alone], dim=-1
    )
    torch.testing.assert_close(fused.model.encode_images(pixels), expected)


@pytest.fixture
def train(monkeypatch, model_folders, tmp_path_factory):
    from mmtrain.train import main

    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    data = tmp_path_factory.mktemp("data")

    def run(out, **flags):
        try:
            # 20 samples: 18 train after the eval split, 2 steps of 8 and the epoch's export
            values = dict(synthetic_num_samples=20, per_device_train_batch_size=8, eval_generate=0)
            return main(common_flags(model_folders, data, output_dir=out, **{**values, **flags}))
        finally:
            reset_accelerate_state()

    return run


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["siglip2", "dinov2", "dinov2-registers", "vit", "dinov2+siglip"])
def test_trains_exports_and_reloads(towers, model_folders, train, tmp_path, kind):
    """Single towers train with vision LoRA; the fused pair frozen, its features cached on disk."""
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import load_pretrained

    first, _, second = kind.partition("+")
    flags = dict(vision_model_name_or_path=towers[first])
    if second:
        flags.update(vision_model_name_or_path_2=towers[second], cache_vision_features=True, vision_cache_dir=str(tmp_path / "cache"))
    else:  # the layer lists' names differ: CLIP/SigLIP encoder.layers., DINOv2 encoder.layer., ViT layers.
        flags.update(vis_lora_dim=2, vis_lora_module_name="layer")
    out = tmp_path / "run"
    train(out, **flags)
    losses = train_losses(out)
    assert len(losses) >= 2 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    export = out / "epoch-0"
    reloaded = load_pretrained(str(export))  # strict: every tensor present, none unexpected
    config = json.loads((export / "mmtrain_config.json").read_text())["model"]
    assert bool(config["vision_model_name_or_path_2"]) == bool(second)
    assert (export / "vision_encoder_2" / "config.json").is_file() == bool(second)
    original = build_model(_args(model_folders, towers[first], towers[second] if second else None))
    pixels = reloaded.image_processor(images=_images(), return_tensors="pt")["pixel_values"]
    assert reloaded.image_tokens.per_image == original.image_tokens.per_image == 64
    with torch.no_grad():
        again, before = reloaded.model.encode_images(pixels), original.model.encode_images(pixels)
    if second:
        # frozen: the export holds the folders' own towers; the cache is kept apart from a
        # single encoder's by an identity naming both (a single encoder's has no second name)
        torch.testing.assert_close(again, before)
        (identity,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/encoder.json")]
        assert identity["vision_model_name_or_path"] == towers[first] and identity["vision_model_name_or_path_2"] == towers[second]
        assert list((tmp_path / "cache").glob("*/*.pt"))
    else:  # vision LoRA trained and fused into the exported tower
        assert again.shape == before.shape and not torch.allclose(again, before)


def _save_tower(folder, config, processor):
    from transformers import AutoModel

    AutoModel.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def test_fused_grids_that_differ_are_refused_in_one_line_naming_both_flags(towers, model_folders, tmp_path):
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig

    from mmtrain.model.builder import check_model_config

    coarse = _save_tower(
        tmp_path / "coarse", SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                image_size=64, patch_size=16),
        SiglipImageProcessorPil(size={"height": 64, "width": 64}),
    )
    with pytest.raises(ConfigError) as e:
        check_model_config(_args(model_folders, towers["dinov2"], coarse))
    message = str(e.value)
    assert "\n" not in message and message.startswith("vision_model_name_or_path ") and " vision_model_name_or_path_2 " in message
    assert e.value.fields == ("vision_model_name_or_path", "vision_model_name_or_path_2")
    assert "8x8" in message and "4x4" in message and towers["dinov2"] in message and coarse in message


def test_fused_towers_refuse_keep_cls(towers, model_folders):
    from mmtrain.model.builder import check_model_config

    with pytest.raises(ConfigError, match="^vision_keep_cls cannot be used with vision_model_name_or_path_2"):
        check_model_config(_args(model_folders, towers["dinov2"], towers["siglip"], vision_keep_cls=True))


def test_configs_that_are_no_patch_token_tower_are_refused_naming_the_class(model_folders, tmp_path):
    from transformers import ConvNextConfig, ConvNextImageProcessorPil

    from mmtrain.model.builder import check_model_config

    convnext = _save_tower(tmp_path / "convnext", ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]), ConvNextImageProcessorPil())
    for folder, name in ((convnext, "ConvNextConfig"), (model_folders["tiny-llama"], "LlamaConfig")):
        with pytest.raises(ConfigError, match=f"^vision_model_name_or_path '{folder}' holds a {name}"):
            check_model_config(_args(model_folders, folder))


@pytest.fixture
def exported(model_folders, tmp_path):
    """exported(vision, vision_2=None) -> an mmtrain export folder."""
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import save_pretrained

    def make(vision, vision_2=None):
        args = _args(model_folders, vision, vision_2, lang_lora_dim=4)
        built = build_model(args)
        folder = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
        save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
        return folder

    return make


def test_a_dinov2_export_becomes_llava_with_the_same_image_features(towers, exported, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmtrain.export import export_llava
    from mmtrain.model.pretrained import load_pretrained

    folder = exported(towers["dinov2"])
    out = export_llava(str(folder), str(tmp_path / "llava"))
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    built = load_pretrained(str(folder))
    images = _images(2)
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = llava.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=llava.config.vision_feature_layer,
            vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        ).pooler_output
        ours = built.model.projector(built.model.encode_images(built.image_processor(images=images, return_tensors="pt")["pixel_values"]))
    torch.testing.assert_close(torch.stack(list(theirs)), ours)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what"}]}], add_generation_prompt=True)
    ids = processor(images=images[:1], text=prompt)["input_ids"][0]
    assert list(ids).count(built.image_tokens.image_id) == 64


@pytest.mark.parametrize(
    ("kinds", "says"),
    [
        (("siglip2",), "needs pixel_attention_mask and spatial_shapes"),
        (("dinov2-registers",), "puts 5 tokens before the patches (4 registers)"),
        (("dinov2", "siglip"), "fuses two vision encoders; LlavaForConditionalGeneration holds one vision tower"),
    ],
)
def test_llava_export_refuses_towers_llava_cannot_hold_in_one_line(towers, exported, tmp_path, capsys, kinds, says):
    from mmtrain.export import main

    folder = exported(*(towers[k] for k in kinds))
    capsys.readouterr()  # the export's own loading
    out = tmp_path / "llava"
    assert main(["--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err and str(folder) in err
    assert not out.exists()


def test_budget_and_memory_count_both_fused_towers(towers, model_folders):
    from mmtrain.budget import model_budget
    from mmtrain.memory import MemorySetup, estimate, model_facts

    single = {k: _args(model_folders, towers[k]) for k in ("dinov2", "siglip")}
    fused = _args(model_folders, towers["dinov2"], towers["siglip"])

    def vision_params(args):
        return next(r for r in model_budget(args) if r.name == "vision encoder").total

    assert vision_params(fused) == vision_params(single["dinov2"]) + vision_params(single["siglip"]) > 0
    facts = {k: model_facts(a) for k, a in single.items()}
    both = model_facts(fused)
    assert both.vision_hidden == 128 and both.patches == both.image_tokens == 64
    assert both.vision_towers == (facts["dinov2"].vision_towers[0], facts["siglip"].vision_towers[0])
    assert [t.tokens for t in both.vision_towers] == [65, 64]
    setup = MemorySetup(micro_batch=2, seq_len=256)
    estimates = {k: estimate(f, setup) for k, f in facts.items()}
    fused_estimate = estimate(both, setup)
    # the towers run one after the other: the larger transient, plus the first's features kept meanwhile
    first_features = 2 * setup.images_per_sample * 64 * 64 * 2
    assert fused_estimate.vision_transient == max(
        estimates["dinov2"].vision_transient, estimates["siglip"].vision_transient + first_features
    )
    assert fused_estimate.frozen_weights > max(e.frozen_weights for e in estimates.values())


@pytest.mark.parametrize(
    ("processor", "says"),
    [
        (dict(size={"shortest_edge": 64}, do_center_crop=False), "gives images of shapes"),  # the size follows the image
        (dict(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96}), "cannot run on 96x96 images"),  # CLIP has 64 px positions
    ],
)
def test_a_processor_the_tower_cannot_take_is_refused_before_weights_load(model_folders, tmp_path, processor, says):
    from transformers import CLIPImageProcessorPil

    from mmtrain.model.builder import check_model_config

    folder = tmp_path / "clip"
    presets.preset_config("tiny-clip").save_pretrained(folder)  # a config and a processor, no weights at all
    CLIPImageProcessorPil(**processor).save_pretrained(folder)
    with pytest.raises(ConfigError, match=f"^vision_model_name_or_path '{folder}': .*{says}"):
        check_model_config(_args(model_folders, str(folder)))


def test_the_second_encoder_flag_is_checked_and_part_of_the_models_identity():
    from mmtrain.args import ModelArguments, parse_args

    with pytest.raises(ConfigError, match="--vision_model_name_or_path_2 'tiny-llama' is a language preset"):
        parse_args(["--vision_model_name_or_path_2", "tiny-llama"])
    record = ModelArguments().identity()
    del record["vision_model_name_or_path_2"]  # checkpoints written before the flag existed: one encoder
    assert ModelArguments().differences(record) == []
    fused = ModelArguments(vision_model_name_or_path="tiny-dinov2", vision_model_name_or_path_2="tiny-siglip")
    assert "vision_model_name_or_path_2: recorded None, now 'tiny-siglip'" in fused.differences(record)
