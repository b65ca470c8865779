"""``--vlm_name_or_path``: a transformers LLaVA folder as the run's starting point.

The imported model computes what the folder computes; exported again as LLaVA it holds
the folder's own tensors and generates the same tokens in plain transformers; a short
LoRA run on top lowers the loss and exports; other VLM classes are refused before any
weights load.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.model import build_model
from mmtrain.model.pretrained import EXPORT_CONFIG, load_pretrained, save_pretrained
from tests.llava_folders import plain_transformers_generate, write_tiny_llava, write_tiny_llava_next


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def _pixels(size: int, count: int = 1, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(count, 3, size, size)


@pytest.mark.parametrize(
    ("vision", "strategy", "layer"), [("tiny-clip", "default", -2), ("tiny-clip", "full", -1), ("tiny-siglip", "full", 1)]
)
def test_imported_model_computes_what_the_llava_folder_computes(tmp_path, vision, strategy, layer):
    from transformers import LlavaForConditionalGeneration

    folder = write_tiny_llava(tmp_path / "llava", vision=vision, strategy=strategy, feature_layer=layer)
    args = ModelArguments(vlm_name_or_path=folder, lang_lora_dim=0)
    assert (args.vision_feature_layer, args.vision_keep_cls, args.image_markup) == (layer, strategy == "full" and vision == "tiny-clip", "llava")
    built = build_model(args)
    tokens = built.image_tokens
    reference = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    assert tokens.image_id == reference.config.image_token_id and tokens.start_id is None
    ids = torch.tensor([[0, 5, 6] + tokens.span() + [7, 8] + tokens.span() + [9]])
    pixels = _pixels(built.model.vision.image_size, 2)
    with torch.no_grad():
        got = built.model.eval()(ids, pixel_values=pixels, return_logits=True).logits
        expected = reference(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(got, expected)
    # the one new-token row is the image token's, started from the folder's row
    rows = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad and n.endswith(".new_rows")]
    assert len(rows) == 1 and torch.equal(rows[0][1][0], reference.get_input_embeddings().weight[tokens.image_id])


def test_a_llava_next_folder_is_imported_with_its_tiles_and_computes_what_it_computes(tmp_path):
    """A LLaVA-NeXT folder: its grids become AnyRes tiles and its newline the projector's; on images of
    three shapes the imported model's logits are transformers' own; exported, the folder's tensors come back."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mmtrain.data.dataset import pixel_inputs
    from mmtrain.export import export_llava

    folder = write_tiny_llava_next(tmp_path / "next")
    args = ModelArguments(vlm_name_or_path=folder, lang_lora_dim=0)
    assert args.image_grid_pinpoints == "64x128,128x64,128x128,64x192" and args.image_markup == "llava"
    built = build_model(args)
    reference = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    torch.manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()) for h, w in ((50, 130), (120, 40), (70, 70))]
    messages = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": "Which?"}]}]
    inputs = processor(images=images, text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    ours = pixel_inputs(images, built.image_processor, (3, 64, 64))
    counts = [built.image_tokens.count((im.height, im.width)) for im in images]
    assert int((inputs["input_ids"] == built.image_tokens.image_id).sum()) == sum(counts) and len(set(counts)) == 3
    with torch.no_grad():
        got = built.model.eval()(inputs["input_ids"], return_logits=True, **ours).logits
        expected = reference(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(built.model.projector.image_newline, reference.model.image_newline)

    export = tmp_path / "export"
    save_pretrained(str(export), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args, template="chat")
    export_llava(str(export), str(tmp_path / "again"), "llava_next")
    original, again = load_file(f"{folder}/model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(again) <= set(original) and [k for k in again if not torch.equal(again[k], original[k])] == []


def test_round_trip_gives_the_folders_tensors_and_generation(tmp_path, llava_folder):
    """Import, train 0 steps (the export the trainer writes), export as LLaVA: the same tensors, the same answer."""
    from mmtrain.export import export_llava

    args = ModelArguments(vlm_name_or_path=llava_folder, lang_lora_dim=4)
    built = build_model(args)  # LoRA on top starts as zero: the model is still the folder's
    export = tmp_path / "export"
    save_pretrained(str(export), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args, template="chat")
    recorded = json.loads((export / EXPORT_CONFIG).read_text())
    assert recorded["trained_with"]["vlm_name_or_path"] == llava_folder
    assert recorded["model"]["image_markup"] == "llava" and recorded["model"]["vlm_name_or_path"] == ""
    out = tmp_path / "llava-again"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exported prompts tokenise as training's
        export_llava(str(export), str(out))

    original, again = load_file(f"{llava_folder}/model.safetensors"), load_file(out / "model.safetensors")
    assert set(again) <= set(original)
    assert [k for k in again if not torch.equal(again[k], original[k])] == []
    # only the vision layer after vision_feature_layer (-2 of 3), which LLaVA computes and discards
    assert {k.split(".layer_norm")[0].split(".mlp")[0].split(".self_attn")[0] for k in set(original) - set(again)} == {
        "vision_tower.encoder.layers.2"
    }
    generated = plain_transformers_generate(tmp_path, llava_folder, out)
    assert generated[llava_folder] == generated[str(out)]
    assert len(generated[llava_folder]["new"]) == 8
    # and the reloaded mmtrain export gives the same logits as the folder
    reloaded = load_pretrained(str(export))
    assert reloaded.image_tokens == built.image_tokens


@pytest.fixture
def train(run_main):
    return run_main


@pytest.fixture(scope="session")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _train_losses(out) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in lines if r["split"] == "train"]


def test_lora_run_on_a_llava_folder_learns_and_exports_to_plain_transformers(tmp_path, llava_folder, data_path, train):
    from mmtrain.export import export_llava
    from mmtrain.model.generation import SamplingOptions, generate

    out = tmp_path / "run"
    argv = [
        "--vlm_name_or_path", llava_folder, "--lang_lora_dim", "4", "--template", "chat",
        "--data_path", str(data_path), "--synthetic_num_samples", "40", "--per_device_train_batch_size", "4",
        "--num_train_epochs", "1", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--num_warmup_steps", "0",
        "--logging_steps", "1", "--eval_generate", "0", "--output_dir", str(out),
    ]
    train(argv)
    losses = _train_losses(out)
    assert len(losses) == 9  # 36 training samples after the eval split, 4 a batch
    assert max(losses[-3:]) < 0.85 * losses[0], losses

    export = sorted(out.glob("epoch-*"))[-1]
    llava_out = tmp_path / "llava"
    export_llava(str(export), str(llava_out))
    generated = plain_transformers_generate(tmp_path, llava_out)[str(llava_out)]
    outputs = torch.load(f"{llava_out}.outputs.pt")
    reloaded = load_pretrained(str(export))
    ids = torch.tensor(generated["input_ids"])
    with torch.no_grad():
        logits = reloaded.model(ids[None], pixel_values=outputs["pixel_values"], return_logits=True).logits[0]
    torch.testing.assert_close(outputs["logits"], logits, rtol=1e-4, atol=1e-4)
    # greedy: transformers was kept from stopping for 8 tokens; mmtrain stops at eos, so its answer is their first part
    tok = reloaded.tokenizer
    ours = generate(reloaded.model, [ids], [outputs["pixel_values"]], eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, options=SamplingOptions(max_new_tokens=8))[0]
    assert generated["new"][: len(ours)] == ours, (generated["new"], ours)
    # the prompt the exported processor renders is the one training made
    assert generated["input_ids"].count(reloaded.image_tokens.image_id) == reloaded.image_tokens.per_image


def test_init_from_a_stage_one_export_of_an_imported_run(tmp_path, llava_folder):
    """Two stages on top: stage 2 takes stage 1's projector and image-token row from its export."""
    from mmtrain.training.init_from import check_source, load_parts

    args = ModelArguments(vlm_name_or_path=llava_folder, lang_lora_dim=0)
    stage1 = build_model(args)
    with torch.no_grad():
        stage1.model.projector.linear_2.bias.add_(1.0)
    export = tmp_path / "epoch-0"
    save_pretrained(str(export), stage1.model.state_dict(), stage1.model, stage1.tokenizer, stage1.image_processor, args)
    stage2_args = ModelArguments(vlm_name_or_path=llava_folder, lang_lora_dim=4)
    source = check_source(str(export), stage2_args, ["projector", "new_rows"])
    stage2 = build_model(stage2_args)
    load_parts(stage2.model, source)
    assert torch.equal(stage2.model.projector.linear_2.bias, stage1.model.projector.linear_2.bias)


def test_chat_templates_that_read_content_parts_get_parts(llava_folder):
    from mmtrain import presets
    from mmtrain.data.formats import _message_text
    from mmtrain.data.template import chat_template_takes_parts, content_parts

    assert chat_template_takes_parts(build_model(ModelArguments(vlm_name_or_path=llava_folder, lang_lora_dim=0), meta=True).tokenizer)
    assert not chat_template_takes_parts(presets.build_preset_tokenizer())  # string contents, as an LM's own template
    for parts in (
        [{"type": "image"}, {"type": "text", "text": "What color?"}],
        [{"type": "text", "text": "Is "}, {"type": "image"}, {"type": "text", "text": " like "}, {"type": "image"}],
        [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?\n"}],
    ):
        assert content_parts(_message_text(parts, "test", 0, 0)) == parts


@pytest.mark.parametrize(
    ("flags", "trained_layers"),
    [
        (dict(lm_training="frozen", lang_lora_dim=0), set()),
        (dict(lm_training="last_layers", lm_trainable_layers=1, lang_lora_dim=0), {3}),
        (dict(lm_training="full", lang_lora_dim=0), {0, 1, 2, 3}),
    ],
)
def test_lm_training_modes_on_an_imported_model(llava_folder, flags, trained_layers):
    built = build_model(ModelArguments(vlm_name_or_path=llava_folder, **flags))
    trained = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n in trained} >= {"projector", "language_model"}
    assert not [n for n in trained if n.startswith("vision_encoder.")]
    layers = {int(n.split("layers.")[1].split(".")[0]) for n in trained if ".layers." in n}
    assert layers == trained_layers


# --- bad input: one line naming the flag, before any weights load ------------------------


def _write_config(folder, **config) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_another_vlm_class_is_refused_naming_it(tmp_path):
    from transformers import Idefics3Config

    idefics = tmp_path / "idefics3"
    Idefics3Config().save_pretrained(idefics)  # a config alone: the refusal must come before weights are looked for
    qwen = _write_config(tmp_path / "qwen2vl", architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl")
    video = _write_config(tmp_path / "video", architectures=["LlavaNextVideoForConditionalGeneration"], model_type="llava_next_video")
    for folder, held in ((str(idefics), "Idefics3ForConditionalGeneration"), (qwen, "Qwen2VLForConditionalGeneration"),
                         (video, "LlavaNextVideoForConditionalGeneration")):
        if held.startswith("Idefics3"):
            held = "model_type 'idefics3'"  # a config saved without architectures still names its type
        with pytest.raises(ConfigError) as e:
            ModelArguments(vlm_name_or_path=folder)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"--vlm_name_or_path {folder!r}")
        assert held in message and "supported, in the llava-hf layout: LlavaForConditionalGeneration" in message
        assert "LlavaNextForConditionalGeneration (model_type 'llava_next')" in message


def test_the_command_line_refuses_it_before_weights(tmp_path, capsys, monkeypatch):
    from mmtrain.train import cli

    folder = _write_config(tmp_path / "qwen2vl", architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl")
    monkeypatch.setattr(sys, "argv", ["mmtrain.train", "--vlm_name_or_path", folder, "--output_dir", str(tmp_path / "out")])
    assert cli() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --vlm_name_or_path") and "Qwen2VLForConditionalGeneration" in err[-1]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (dict(vision_feature_layer=[-2, -1]), "concatenates several layers"),
        (dict(projector_hidden_act="silu"), "is not the mlp projector"),
        (dict(vision_feature_select_strategy="pooled"), "vision_feature_select_strategy"),
    ],
)
def test_llava_settings_mmtrain_cannot_build_are_named(tmp_path, llava_folder, change, says):
    import shutil

    folder = tmp_path / "changed"
    shutil.copytree(llava_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=says):
        ModelArguments(vlm_name_or_path=str(folder))


def test_siglip_tower_with_the_default_strategy_is_refused(tmp_path):
    folder = write_tiny_llava(tmp_path / "siglip", vision="tiny-siglip", strategy="default")
    with pytest.raises(ConfigError, match="no CLS token"):
        ModelArguments(vlm_name_or_path=folder)


def test_another_projector_and_init_from_a_llava_folder_are_refused(llava_folder):
    from mmtrain.training.init_from import check_source

    with pytest.raises(ConfigError, match="brings its own projector, an mlp"):
        ModelArguments(vlm_name_or_path=llava_folder, vis_proj="perceiver")
    with pytest.raises(ConfigError, match=f"start from it with --vlm_name_or_path {llava_folder}"):
        check_source(llava_folder, ModelArguments(lang_lora_dim=0), ["projector"])


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder with a config.json"):
        ModelArguments(vlm_name_or_path=str(tmp_path / "nowhere"))
