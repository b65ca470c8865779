"""``python -m mmtrain.export``: exit codes and messages of the command line, and the
chat template the LLaVA folder carries (it renders exactly the prompts training made).

What the LLaVA folder computes (the same logits and generated tokens, loadable without
mmtrain) is tested with the exports in tests/model/test_pretrained.py.
"""

from __future__ import annotations

import copy
import json

import pytest

from mmtrain.export import chat_template_for, main


@pytest.fixture
def export(tmp_path, tiny_args):
    """export(**model_flags) -> an mmtrain export folder of a tiny model."""
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import save_pretrained

    def make(**kw):
        args = tiny_args(lang_lora_dim=4, **kw)
        built = build_model(args)
        folder = tmp_path / f"export-{len(list(tmp_path.glob('export-*')))}"
        save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
        return folder

    return make


def _one_error_line(err: str) -> str:
    """The error message: one line, the last one (loading may have drawn progress bars before it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def test_cli_writes_a_llava_folder(export, tmp_path, capsys):
    folder = export(vis_proj="mlp")
    out = tmp_path / "llava"
    assert main(["--model", str(folder), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert (out / "processor_config.json").is_file() or (out / "preprocessor_config.json").is_file()
    assert list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (dict(vis_proj="perceiver"), "the 'perceiver' projector has no exact LLaVA equivalent"),
        (dict(vis_proj="mlp", enable_mmca_attention=True), "trained with MMCA attention"),
    ],
)
def test_cli_refuses_models_llava_cannot_run_in_one_line(export, tmp_path, capsys, flags, says):
    folder = export(**flags)
    out = tmp_path / "llava"
    assert main(["--model", str(folder), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert says in line and str(folder) in line
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize(
    ("flags", "fmt", "says"),
    [
        (dict(vis_proj="mlp", anyres_max_tiles=2), "llava", "encodes images as AnyRes tiles, which LlavaForConditionalGeneration cannot lay out: use --format llava_next"),
        (dict(vis_proj="mlp"), "llava_next", "LlavaNextForConditionalGeneration always tiles images: use --format llava"),
    ],
)
def test_cli_names_the_format_a_tiled_or_untiled_model_needs(export, tmp_path, capsys, flags, fmt, says):
    folder = export(**flags)
    out = tmp_path / "hf"
    assert main(["--model", str(folder), "--out", str(out), "--format", fmt]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert says in line and str(folder) in line and not out.exists()


@pytest.mark.parametrize("kind", ["empty folder", "missing folder", "a model folder"])
def test_cli_names_a_folder_that_is_not_an_export(tmp_path, capsys, model_folders, kind):
    if kind == "a model folder":
        folder = model_folders["tiny-llama"]  # a Hugging Face folder, not an mmtrain export
    else:
        folder = tmp_path / kind.split()[0]
        if kind == "empty folder":
            folder.mkdir()
    assert main(["--model", str(folder), "--out", str(tmp_path / "llava")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(folder) in line and "export" in line
    assert not (tmp_path / "llava").exists()


# --- the chat template -----------------------------------------------------------------

def _image():
    return {"type": "image"}


def _text(text):
    return {"type": "text", "text": text}


# Conversations as transformers' processors take them; ``str`` contents carry their own
# placeholders, as mmtrain's data does.
CONVERSATIONS = {
    "one image": [{"role": "user", "content": [_image(), _text("What color is the shape?")]}],
    "two images": [{"role": "user", "content": [_image(), _image(), _text("Which one is red?")]}],
    "text only": [{"role": "user", "content": [_text("How many shapes are there?")]}],
    "placeholder in a string": [{"role": "user", "content": "<image>\nWhat color is the shape?"}],
    "images inside the question": [
        {"role": "user", "content": [_text("Is "), _image(), _text(" the same as "), _image(), _text("? ")]}
    ],
    "leading blank and a later image": [{"role": "user", "content": " <image>\n  What is left of <image> ?"}],
    "two turns": [
        {"role": "user", "content": [_image(), _text("What shape is it?")]},
        {"role": "assistant", "content": [_text(" a red circle ")]},
        {"role": "user", "content": [_image(), _text("And this one?")]},
    ],
    "own system turn": [
        {"role": "system", "content": [_text("Answer in one word.")]},
        {"role": "user", "content": [_image(), _text("What color?")]},
    ],
    "blank system turn": [{"role": "system", "content": "  "}, {"role": "user", "content": "What color?"}],
}

SYSTEM_PROMPTS = ["", "You are a helpful assistant that looks at images.", ' quotes " and \\ , {{ braces }}, é\t😀\n']


def _turns(messages):
    """The conversation as mmtrain's data reads such a record: placeholders in the text."""
    from mmtrain.data.formats import _message_text

    return [{"role": m["role"], "text": _message_text(m["content"], "test", 0, t)} for t, m in enumerate(messages)]


def _tokenizer(kind):
    from tokenizers import processors

    from mmtrain.presets import build_preset_tokenizer

    tokenizer = build_preset_tokenizer()
    if kind == "adds bos":  # as LLaMA's tokenizers do
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        assert tokenizer("a")["input_ids"][0] == 0
    elif kind == "no bos":  # as Qwen2's
        tokenizer.bos_token = None
    return tokenizer


@pytest.fixture(scope="module")
def processors_by_tokenizer():
    """{tokenizer kind: (the training tokenizer, its ImageTokens, a LlavaProcessor factory)} on the tiny CLIP's sizes."""
    from transformers import LlavaProcessor

    from mmtrain.model.tokens import add_image_tokens
    from mmtrain.presets import build_preset_image_processor, preset_config

    vision = preset_config("tiny-clip")
    per_image = (vision.image_size // vision.patch_size) ** 2  # "default" strategy: CLS dropped
    made = {}
    for kind in ("preset", "adds bos", "no bos"):
        tokenizer = _tokenizer(kind)
        image_tokens = add_image_tokens(tokenizer, per_image)

        def processor(chat_template, tokenizer=tokenizer):
            exported = copy.deepcopy(tokenizer)
            exported.chat_template = chat_template
            return LlavaProcessor(
                image_processor=build_preset_image_processor(vision), tokenizer=exported, patch_size=vision.patch_size,
                vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template,
            )

        made[kind] = (tokenizer, image_tokens, processor)
    return made


@pytest.mark.parametrize("kind", ["preset", "adds bos", "no bos"])
@pytest.mark.parametrize("template", ["plain", "chat"])
def test_chat_template_renders_the_training_prompt(processors_by_tokenizer, kind, template):
    """Both ways transformers builds a prompt give the ids training gave the same conversation."""
    from PIL import Image

    from mmtrain.data.template import encode_conversation

    tokenizer, image_tokens, make_processor = processors_by_tokenizer[kind]
    for system_prompt in SYSTEM_PROMPTS:
        processor = make_processor(chat_template_for(tokenizer, template, system_prompt))
        for name, messages in CONVERSATIONS.items():
            expected = encode_conversation(
                _turns(messages), tokenizer, image_tokens, template=template, system_prompt=system_prompt,
                add_generation_prompt=True,
            ).input_ids
            count = sum(t["text"].count("<image>") for t in _turns(messages))
            images = [Image.new("RGB", (64, 64), (40 * k, 0, 0)) for k in range(count)]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            got = processor(images=images or None, text=prompt)["input_ids"][0]
            assert list(got) == expected, f"{name} (system prompt {system_prompt!r}): {prompt!r}"
            # and tokenised by apply_chat_template itself (it drops special tokens when the text starts with bos)
            with_images = copy.deepcopy(messages)
            pending = iter(images)
            for m in with_images:
                if not isinstance(m["content"], str):
                    for part in m["content"]:
                        if part["type"] == "image":
                            part["image"] = next(pending)
            if all(not isinstance(m["content"], str) for m in messages):
                tokenized = processor.apply_chat_template(
                    with_images, add_generation_prompt=True, tokenize=True, return_dict=True
                )
                assert list(tokenized["input_ids"][0]) == expected, name
        if kind != "no bos":
            assert expected.count(tokenizer.bos_token_id) == 1 and expected[0] == tokenizer.bos_token_id


def test_chat_template_keeps_what_a_plain_prompt_looks_like(processors_by_tokenizer):
    """The rendered text, readable: what a user who writes a prompt by hand must write."""
    tokenizer, _, _ = processors_by_tokenizer["preset"]
    rendering = copy.deepcopy(tokenizer)
    rendering.chat_template = chat_template_for(tokenizer, "plain", "Be brief.")
    text = rendering.apply_chat_template(CONVERSATIONS["two turns"], add_generation_prompt=True, tokenize=False)
    image = "<im_start><image><im_end>"
    assert text == (
        f"<s>Be brief.\n\n### Image 1:\n{image}\n\n### Question:\nWhat shape is it?\n\n### Answer:\na red circle</s>"
        f"### Image 2:\n{image}\n\n### Question:\nAnd this one?\n\n### Answer:\n"
    )


VIDEO_CONVERSATIONS = {
    "one video": [{"role": "user", "content": [{"type": "video"}, _text("What moves?")]}],
    "image then video": [{"role": "user", "content": [_image(), {"type": "video"}, _text("Same color?")]}],
    "video inside the question": [{"role": "user", "content": "Does <image> appear in <video> ?"}],
    "two turns": [
        {"role": "user", "content": [{"type": "video"}, _text("What moves?")]},
        {"role": "assistant", "content": [_text("a square")]},
        {"role": "user", "content": [{"type": "video"}, _image(), _text("And here?")]},
    ],
}


@pytest.mark.parametrize("kind", ["preset", "no bos"])
@pytest.mark.parametrize("template", ["plain", "chat"])
def test_chat_template_renders_videos_as_training_does(kind, template):
    """Videos and images mixed: the rendered prompt, each placeholder expanded as the processors expand it, is training's ids."""
    from mmtrain.data.template import encode_conversation
    from mmtrain.model.tokens import add_image_tokens

    tokenizer = _tokenizer(kind)
    image_tokens = add_image_tokens(tokenizer, 9, per_frame=4)
    rendering = copy.deepcopy(tokenizer)
    rendering.chat_template = chat_template_for(tokenizer, template, "Be brief.")
    for name, messages in VIDEO_CONVERSATIONS.items():
        turns = _turns(messages)
        frames = [2 + k for k in range(sum(t["text"].count("<video>") for t in turns))]
        expected = encode_conversation(
            turns, tokenizer, image_tokens, template=template, system_prompt="Be brief.", add_generation_prompt=True, video_frames=frames,
        ).input_ids
        rendered = rendering.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pieces = rendered.replace("<image>", "<image>" * 9).split("<video>")
        text = pieces[0] + "".join("<video>" * (4 * n) + piece for n, piece in zip(frames, pieces[1:]))
        assert tokenizer(text)["input_ids"] == expected, f"{name}: {text[:300]!r}"
        assert expected.count(image_tokens.video_id) == 4 * sum(frames) > 0, name
    if template == "plain":  # images and videos numbered apart, each under its own heading
        assert "### Video 2:\n<im_start><video><im_end>\n\n### Image 1:\n<im_start><image><im_end>\n\n### Question:" in rendered
