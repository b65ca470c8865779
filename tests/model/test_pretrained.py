"""Exports: reloading gives the same logits; tampered exports fail; LLaVA export matches without mmtrain."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmtrain.args import ConfigError
from mmtrain.model import build_model
from mmtrain.model.pretrained import load_pretrained, save_pretrained


def _trained_model(tiny_args, **kw):
    """A tiny model with non-trivial trainable weights, as if trained."""
    args = tiny_args(lang_lora_dim=4, lang_lora_alpha=4, **kw)
    torch.manual_seed(0)  # projector and adapter initialisation draw from the global generator
    built = build_model(args)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    built.model.eval()
    return args, built


def _inputs(built, images=2):
    it = built.image_tokens
    ids = [3]
    for _ in range(images):
        ids += it.span() + [7]
    ids += [5, 6, 8, 9]
    size = built.model.vision.image_size
    torch.manual_seed(2)
    return torch.tensor([ids]), torch.randn(images, 3, size, size)


def _export(tmp_path, tiny_args, **kw):
    args, built = _trained_model(tiny_args, **kw)
    folder = tmp_path / "export"
    save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
    return folder, built


def test_reloaded_export_gives_the_same_logits(tmp_path, tiny_args):
    folder, built = _export(tmp_path, tiny_args)
    ids, pixels = _inputs(built)
    with torch.no_grad():
        expected = built.model(ids, pixel_values=pixels, return_logits=True).logits
        reloaded = load_pretrained(str(folder))
        got = reloaded.model(ids, pixel_values=pixels, return_logits=True).logits
    assert not any(".lora_" in n for n, _ in reloaded.model.named_parameters()), "an export is loaded without adapters"
    vocab = expected.shape[-1]
    # LoRA is fused in the export: equal up to fp32 rounding of W + BA
    torch.testing.assert_close(got[..., :vocab], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("piece", ["projector.safetensors", "language_model/model.safetensors"])
def test_tampered_export_fails_to_load(tmp_path, tiny_args, piece):
    folder, _ = _export(tmp_path, tiny_args)
    path = folder / piece
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)
    with pytest.raises(ConfigError, match="missing|Missing"):
        load_pretrained(str(folder))


def test_unexpected_tensor_in_export_fails(tmp_path, tiny_args):
    folder, _ = _export(tmp_path, tiny_args)
    path = folder / "vision_encoder" / "model.safetensors"
    tensors = load_file(path)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(ConfigError, match="unexpected"):
        load_pretrained(str(folder))


def test_not_an_export_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not an mmtrain export"):
        load_pretrained(str(tmp_path))


LLAVA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder, inputs, out = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    AutoProcessor.from_pretrained(folder)
    data = torch.load(inputs)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], pixel_values=data["pixel_values"]).logits
    assert not any(name.startswith("mmtrain") for name in sys.modules), "mmtrain was imported"
    torch.save(logits, out)
    """
)


def test_llava_export_matches_mmtrain_in_plain_transformers(tmp_path, tiny_args):
    from mmtrain.export import export_llava

    folder, built = _export(tmp_path, tiny_args)
    llava_dir = tmp_path / "llava"
    export_llava(str(folder), str(llava_dir))
    reloaded = load_pretrained(str(folder))
    ids, pixels = _inputs(built)
    with torch.no_grad():
        expected = reloaded.model(ids, pixel_values=pixels, return_logits=True).logits
    torch.save({"input_ids": ids, "pixel_values": pixels}, tmp_path / "inputs.pt")
    script = tmp_path / "check.py"
    script.write_text(LLAVA_SCRIPT)
    # run outside the repository so that mmtrain cannot be imported by accident
    proc = subprocess.run(
        [sys.executable, str(script), str(llava_dir), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    vocab = built.image_tokens.original_vocab_size
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("proj", ["baseline", "vit", "perceiver"])
def test_llava_export_refuses_projectors_without_an_exact_mapping(tmp_path, tiny_args, proj):
    from mmtrain.export import export_llava

    folder, _ = _export(tmp_path, tiny_args, vis_proj=proj)
    with pytest.raises(ConfigError, match="no exact LLaVA equivalent"):
        export_llava(str(folder), str(tmp_path / "llava"))


def _greedy_by_forward(chat, turns, images, max_new_tokens):
    """Greedy decoding redone the slow way: a full forward per token, no KV cache, images from pixels."""
    from PIL import Image

    built = chat.built
    ids = torch.tensor([chat.encode_prompt(turns)])
    pixels = built.image_processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(built.model(ids, pixel_values=pixels, return_logits=True).logits[0, -1].argmax())
            if token == built.tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return built.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_with_one_and_two_images(tmp_path, tiny_args, capsys):
    from PIL import Image

    from mmtrain.generate import Chat, main, with_placeholders
    from mmtrain.model.generation import SamplingOptions

    # The projector and LoRA are drawn from the global generator: seeded, the model (and
    # so its answers) is the same whichever tests ran before.
    torch.manual_seed(0)
    folder, _ = _export(tmp_path, tiny_args)
    red, blue = str(tmp_path / "red.png"), str(tmp_path / "blue.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(red)
    Image.new("RGB", (64, 64), (0, 0, 255)).save(blue)
    options = SamplingOptions(max_new_tokens=5)
    chat = Chat(str(folder), options=options)

    def user(prompt, images):
        return {"role": "user", "text": with_placeholders(prompt, len(images))}

    # The chat's answers (cached decoding, features encoded apart) are the greedy
    # continuations of the model's own logits, with one image and with two.
    one = chat.ask("What color is it?", [red], keep=False)
    two = chat.ask("<image>\n<image>\nWhich is red?", [red, blue], keep=False)
    assert one and two, "an empty answer would make the comparisons below vacuous"
    assert one == _greedy_by_forward(chat, [user("What color is it?", [red])], [red], 5)
    assert two == _greedy_by_forward(chat, [user("<image>\n<image>\nWhich is red?", [red, blue])], [red, blue], 5)
    assert chat.turns == [] and chat.features == [], "keep=False leaves no history"
    # greedy decoding is deterministic, also across loads of the export
    assert Chat(str(folder), options=options).ask("What color is it?", [red], keep=False) == one

    # multi-turn: the first image's features are kept, the second turn adds one, and
    # the second answer is the greedy continuation of the whole conversation
    first = chat.ask("What color is it?", [red])
    assert first == one
    second = chat.ask("And this one?", [blue])
    assert len(chat.features) == 2 and len(chat.turns) == 4
    assert chat.turns[1] == {"role": "assistant", "text": first} and chat.turns[3] == {"role": "assistant", "text": second}
    history = [user("What color is it?", [red]), {"role": "assistant", "text": first}, user("And this one?", [blue])]
    assert second == _greedy_by_forward(chat, history, [red, blue], 5)

    # the CLI prints exactly what the chat answers: a JSON line per prompt, or the bare answer
    capsys.readouterr()
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"prompt": "What color is it?", "images": [red]}) + "\n")
    assert main(["--model", str(folder), "--prompts_file", str(prompts), "--max_new_tokens", "5", "--device", "cpu"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [{"prompt": "What color is it?", "answer": one}]
    assert main(["--model", str(folder), "--image", red, "--prompt", "What color is it?", "--max_new_tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == one + "\n"
    with pytest.raises(ConfigError, match="placeholders"):
        chat.ask("<image>\nWhat?", [red, blue])


@pytest.mark.parametrize("image_attention", ["same_image", "self"])
def test_mmca_export_reloads_with_mmca_and_the_same_logits(tmp_path, tiny_args, image_attention):
    """What the LM was trained with travels in the export: MMCA is back on after loading."""
    from mmtrain.export import export_llava
    from mmtrain.model.mmca import ATTENTION_NAMES, uses_mmca

    folder, built = _export(tmp_path, tiny_args, enable_mmca_attention=True, mmca_image_attention=image_attention)
    reloaded = load_pretrained(str(folder))
    assert uses_mmca(reloaded.model.language_model)
    assert reloaded.model.language_model.config._attn_implementation == ATTENTION_NAMES[image_attention]
    ids, pixels = _inputs(built)
    with torch.no_grad():
        expected = built.model(ids, pixel_values=pixels, return_logits=True).logits
        got = reloaded.model(ids, pixel_values=pixels, return_logits=True).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="MMCA"):
        export_llava(str(folder), str(tmp_path / "llava"))


def test_format_1_exports_still_load_with_plain_attention(tmp_path, tiny_args):
    from mmtrain.model.mmca import uses_mmca

    """An export written before the model config was saved (format 1) loads from its few keys."""
    folder, built = _export(tmp_path, tiny_args)
    manifest = json.loads((folder / "mmtrain_config.json").read_text())
    model = manifest["model"]
    legacy = {
        "format_version": 1,
        "vis_proj": model["vis_proj"],
        "perceiver_num_queries": model["perceiver_num_queries"],
        "vision_keep_cls": model["vision_keep_cls"],
        "image_tokens_per_image": manifest["image_tokens_per_image"],
        "original_vocab_size": manifest["original_vocab_size"],
        "template": "plain",
        "system_prompt": "",
        "trained_from": {"lm": "x", "vision": "y"},
    }
    (folder / "mmtrain_config.json").write_text(json.dumps(legacy))
    reloaded = load_pretrained(str(folder))
    assert not uses_mmca(reloaded.model.language_model)
    ids, pixels = _inputs(built)
    with torch.no_grad():
        expected = built.model(ids, pixel_values=pixels, return_logits=True).logits
        got = reloaded.model(ids, pixel_values=pixels, return_logits=True).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
