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


def test_an_export_that_fails_to_load_names_the_config_field_below_and_in_the_commands_that_read_it(tmp_path, tiny_args, capsys):
    """Loading an export takes no flags: the error speaks of the export's config, and so do mmtrain.generate and
    mmtrain.export, which read that config (they have no such flag); one line each."""
    from mmtrain.export import main as export_main
    from mmtrain.generate import main as generate_main

    folder, _ = _export(tmp_path, tiny_args)
    path = folder / "language_model" / "model.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, path)
    said = f"lm_model_name_or_path {str(folder / 'language_model')!r} does not match its config: missing tensors"
    with pytest.raises(ConfigError) as below:
        load_pretrained(str(folder))
    assert str(below.value).startswith(said) and below.value.fields == ("lm_model_name_or_path",)
    capsys.readouterr()
    for main, argv in ((generate_main, ["--prompt", "hi", "--device", "cpu"]), (export_main, ["--out", str(tmp_path / "llava")])):
        assert main(["--model", str(folder), *argv]) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bars
        assert last.startswith(f"error: {said}"), last


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


def test_exports_carry_the_tokenizers_token_ids(tmp_path, tiny_args):
    """Whatever the LM's config says (here LLaMA's defaults, bos 1 and eos 2, which are
    `</s>` and `<pad>` in this tokenizer), the exports name the tokenizer's ids."""
    from transformers import AutoTokenizer

    from mmtrain.export import export_llava

    args, built = _trained_model(tiny_args)
    lm = built.model.language_model
    lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id = 1, 2, None
    lm.generation_config.bos_token_id, lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = 1, 2, None
    folder, llava = tmp_path / "export", tmp_path / "llava"
    save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
    export_llava(str(folder), str(llava))

    tok = built.tokenizer
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    assert ids == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    written = {
        "language_model/config.json": json.loads((folder / "language_model" / "config.json").read_text()),
        "language_model/generation_config.json": json.loads((folder / "language_model" / "generation_config.json").read_text()),
        "llava config text_config": json.loads((llava / "config.json").read_text())["text_config"],
        "llava generation_config.json": json.loads((llava / "generation_config.json").read_text()),
    }
    for name, data in written.items():
        assert {k: data.get(k) for k in ids} == ids, name
    exported = AutoTokenizer.from_pretrained(llava)
    assert (exported.bos_token_id, exported.eos_token_id, exported.pad_token_id) == tuple(ids.values())
    # a pad id in the config makes the embedding a padding one; loading keeps the exported row
    reloaded = load_pretrained(str(folder))
    rows = built.image_tokens.original_vocab_size  # past them: the new tokens' rows, written in
    original = built.model.language_model.get_input_embeddings().base.weight[:rows]
    assert torch.equal(reloaded.model.language_model.get_input_embeddings().base.weight[:rows], original)
    assert original[tok.pad_token_id].abs().sum() > 0


def test_llava_export_checks_its_prompts_against_training(tmp_path, tiny_args, monkeypatch):
    """The export renders prompts through the saved processor and compares them with the
    ids training made: silent when they agree, a warning naming the case when not."""
    import warnings

    from mmtrain import export

    folder, _ = _export(tmp_path, tiny_args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.export_llava(str(folder), str(tmp_path / "llava"))
    assert not [w for w in caught if "tokenise differently" in str(w.message)]

    right = export.chat_template_for
    monkeypatch.setattr(export, "chat_template_for", lambda tok, template, system, **kw: right(tok, template, "Be brief.", **kw))
    with pytest.warns(UserWarning, match="tokenise differently") as record:
        export.export_llava(str(folder), str(tmp_path / "llava-wrong"))
    message = str(record[0].message)
    assert all(f"{case}: token 1 is" in message for case in ("one image", "two images", "text only", "two turns"))


GENERATE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    llava_dir, lm_dir, cases_path, out = sys.argv[1:5]
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    processor = AutoProcessor.from_pretrained(llava_dir)
    for name, case in cases["llava"].items():
        prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True)
        images = [Image.open(path).convert("RGB") for path in case["images"]]
        inputs = processor(images=images or None, text=prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1]:].tolist()
        text = processor.decode(new, skip_special_tokens=True).strip()
        results[name] = {"prompt": inputs["input_ids"][0].tolist(), "ids": new, "text": text}
    # mmtrain's own export: its language model folder alone, on a text-only prompt
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    prompt = torch.tensor([cases["lm_prompt"]])
    with torch.no_grad():
        ids = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    new = ids[0, prompt.shape[1]:].tolist()
    results["language model"] = {"ids": new, "text": tokenizer.decode(new, skip_special_tokens=True).strip()}
    assert not any(m == "mmtrain" or m.startswith("mmtrain.") for m in sys.modules), "mmtrain was imported"
    with open(out, "w") as f:
        json.dump(results, f)
    """
)

# (question, image names): what mmtrain.generate is asked, and transformers with the
# same images in front of the question.
GENERATION_CASES = {
    "one image": ("What color is the shape?", ["red"]),
    "two images": ("Which one is red?", ["red", "blue"]),
    "text only": ("How many shapes are there?", []),
}


def _greedy_ids(built, template, system_prompt, question, images, max_new_tokens=8):
    """Greedy new ids of ``built`` for ``question``, prompted as mmtrain.generate prompts (eos dropped)."""
    from PIL import Image

    from mmtrain.data.template import encode_conversation
    from mmtrain.generate import with_placeholders
    from mmtrain.model.generation import SamplingOptions, generate

    turns = [{"role": "user", "text": with_placeholders(question, len(images))}]
    size = built.model.vision.image_size
    decoded = [Image.open(p).convert("RGB") for p in images]
    sizes = [(im.height, im.width) for im in decoded]
    ids = encode_conversation(turns, built.tokenizer, built.image_tokens, template=template, system_prompt=system_prompt,
                              add_generation_prompt=True, image_sizes=sizes).input_ids
    pixels = built.image_processor(images=decoded, return_tensors="pt")["pixel_values"] if images else torch.zeros(0, 3, size, size)
    tok = built.tokenizer
    return generate(built.model, [torch.tensor(ids)], [pixels], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    options=SamplingOptions(max_new_tokens=max_new_tokens), image_sizes=[torch.tensor(sizes).reshape(-1, 2)])[0]


def _same_tokens(hf_ids, mmtrain_ids, tokenizer) -> bool:
    """transformers' new ids (eos kept) are mmtrain's (eos and pads dropped); True when both stopped at eos."""
    stopped = bool(hf_ids) and hf_ids[-1] == tokenizer.eos_token_id
    body = hf_ids[:-1] if stopped else hf_ids
    assert [t for t in body if t != tokenizer.pad_token_id] == mmtrain_ids, (hf_ids, mmtrain_ids)
    return stopped


@pytest.mark.parametrize(
    ("template", "system_prompt", "tiles"),
    [("plain", "", False), ("chat", "You are a helpful assistant that looks at images.", False), ("plain", "", True)],
    ids=["plain", "chat", "anyres-llava-next"],
)
def test_exports_generate_what_mmtrain_generates(tmp_path, tiny_args, template, system_prompt, tiles):
    """transformers alone, from the LLaVA folder and from the export's LM folder, answers with
    mmtrain.generate's tokens; and the reloaded export answers as the model in training did.

    With AnyRes tiles the folder is LLaVA-NeXT's, and the images are of each aspect class
    (wide, tall, and one that fits a single tile), so each takes its own grid and token count."""
    from PIL import Image

    from mmtrain.data.template import encode_conversation
    from mmtrain.export import export_llava
    from mmtrain.generate import Chat, with_placeholders
    from mmtrain.model.generation import SamplingOptions

    paths = {"red": str(tmp_path / "red.png"), "blue": str(tmp_path / "blue.png"), "green": str(tmp_path / "green.png")}
    shapes = {"red": (150, 60), "blue": (50, 170), "green": (40, 40)} if tiles else {c: (64, 64) for c in paths}
    for color, rgb in (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 160, 0))):
        image = Image.new("RGB", shapes[color], rgb)
        image.putpixel((1, 1), (255, 255, 255))  # not flat: the tiles of one image differ
        image.save(paths[color])
    generation_cases = {**GENERATION_CASES, **({"tall image": ("What color is it?", ["blue"]), "small image": ("What color is it?", ["green"])} if tiles else {})}
    cases = {name: (q, [paths[i] for i in images]) for name, (q, images) in generation_cases.items()}

    args, built = _trained_model(tiny_args, **({"anyres_max_tiles": 4} if tiles else {}))
    tok = built.tokenizer
    # A random model almost never emits eos. Swapping the output rows of eos and of a
    # token in the text-only answer makes that answer stop there, as a trained model
    # stops after its answer; every answer is the same up to that token. The token comes
    # after some decodable text (many of the tiny LM's ids lie past its tokenizer's
    # vocabulary and decode to '') and is missing from an image answer, which runs on.
    before = {name: _greedy_ids(built, template, system_prompt, *case) for name, case in cases.items()}
    text = before["text only"]
    stop_at = next(
        (t for k, t in enumerate(text) if k >= 2 and t not in text[:k] and t not in (tok.eos_token_id, tok.pad_token_id)
         and (t not in before["one image"] or t not in before["two images"])
         and tok.decode(text[:k], skip_special_tokens=True).strip()),
        None,
    )
    assert stop_at is not None, f"no token to stop at in {before}: choose other questions"
    head = built.model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        head[[tok.eos_token_id, stop_at]] = head[[stop_at, tok.eos_token_id]]
    folder = tmp_path / "export"
    save_pretrained(str(folder), built.model.state_dict(), built.model, tok, built.image_processor, args,
                    template=template, system_prompt=system_prompt)
    export_llava(str(folder), str(tmp_path / "llava"), "llava_next" if tiles else "llava")

    chat = Chat(str(folder), options=SamplingOptions(max_new_tokens=8))
    reloaded = chat.built
    expected = {}
    for name, (question, images) in cases.items():
        ids = _greedy_ids(reloaded, template, system_prompt, question, images)
        in_training = _greedy_ids(built, template, system_prompt, question, images)
        assert ids == in_training, f"{name}: the reloaded export answers otherwise than the model in training"
        assert chat.ask(question, images, keep=False) == reloaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
        expected[name] = ids

    # transformers' conversation format; and a string content with its placeholder, as the issue's user wrote it
    llava_cases = {
        name: {"messages": [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": q}]}],
               "images": images}
        for name, (q, images) in cases.items()
    }
    llava_cases["placeholder in a string"] = {
        "messages": [{"role": "user", "content": "<image>\nWhat color is the shape?"}], "images": [paths["red"]],
    }
    expected["placeholder in a string"] = expected["one image"]
    text_only = [{"role": "user", "text": cases["text only"][0]}]
    lm_prompt = encode_conversation(text_only, reloaded.tokenizer, reloaded.image_tokens, template=template,
                                    system_prompt=system_prompt, add_generation_prompt=True).input_ids
    (tmp_path / "cases.json").write_text(json.dumps({"llava": llava_cases, "lm_prompt": lm_prompt}))
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_SCRIPT)
    run_dir = tmp_path / "elsewhere"  # outside the repository: mmtrain cannot be imported by accident
    run_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "llava"), str(folder / "language_model"), str(tmp_path / "cases.json"),
         str(tmp_path / "generated.json")],
        cwd=run_dir, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "generated.json").read_text())

    stopped = {}
    for name, ids in expected.items():
        question, images = cases.get(name, cases["one image"])
        user = {"role": "user", "text": with_placeholders(question, len(images))}
        sizes = [Image.open(p).size[::-1] for p in images]
        prompt = encode_conversation([user], reloaded.tokenizer, reloaded.image_tokens, template=template,
                                     system_prompt=system_prompt, add_generation_prompt=True, image_sizes=sizes).input_ids
        assert got[name]["prompt"] == prompt, f"{name}: the chat template's prompt is not the one training used"
        stopped[name] = _same_tokens(got[name]["ids"], ids, reloaded.tokenizer)
        assert got[name]["text"] == reloaded.tokenizer.decode(ids, skip_special_tokens=True).strip(), name
    assert _same_tokens(got["language model"]["ids"], expected["text only"], reloaded.tokenizer)
    # not vacuous: one answer ends at eos after some tokens, and another runs on
    assert stopped["text only"] and len(expected["text only"]) >= 2 and got["text only"]["text"]
    assert any(len(expected[n]) >= 4 and not stopped[n] for n in ("one image", "two images"))
    assert expected["one image"] != expected["two images"]


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
