"""Every causal-LM family transformers ships that users bring: train, export, LLaVA export, same answers.

Each family is a tiny random model written as a real Hugging Face folder (its config
class, ``save_pretrained``, the presets' tokenizer), with every default of its config
kept but the sizes (so Gemma's tied and scaled embeddings, Gemma 2's capped logits,
GPT-NeoX's ``gpt_neox.layers`` and Falcon's ``transformer.h`` are all there). Each is
trained for a few steps through ``mmtrain.train.main`` with no family-specific flag,
exported, exported as LLaVA, and plain transformers (one subprocess for all families,
run where mmtrain cannot be imported) must answer with mmtrain's greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from ..conftest import reset_accelerate_state

# family -> (config class, what its config needs besides the shared sizes)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {}),
    "smollm3": ("SmolLM3Config", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "cohere": ("CohereConfig", {}),
    "gpt_neox": ("GPTNeoXConfig", {"drop": ("num_key_value_heads",)}),
    "falcon": ("FalconConfig", {"drop": ("intermediate_size", "num_key_value_heads")}),
}
# families whose input table is not named embed_tokens (GPT-NeoX: embed_in, Falcon: word_embeddings)
TABLE_NOT_EMBED_TOKENS = {"gpt_neox", "falcon"}
SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _family_config(family: str):
    import transformers

    from mmtrain import presets

    class_name, extra = FAMILIES[family]
    extra = dict(extra)
    values = {k: v for k, v in SHAPE.items() if k not in extra.pop("drop", ())}
    # the presets' tokenizer: its ids, and no pad id in the config (it would zero that row)
    values.update(vocab_size=presets.PRESET_TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=None, **extra)
    return getattr(transformers, class_name)(**values)


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """family(name) -> a tiny random LM folder of that family with the presets' tokenizer, written once per module."""
    from transformers import AutoModelForCausalLM

    from mmtrain import presets

    root = tmp_path_factory.mktemp("lm-families")
    tokenizer = presets.build_preset_tokenizer()
    written = {}

    def folder(family: str) -> str:
        if family not in written:
            path = root / family
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_family_config(family), attn_implementation="eager").save_pretrained(path)
            tokenizer.save_pretrained(path)
            written[family] = str(path)
        return written[family]

    return folder


@pytest.fixture(scope="module")
def trained_families(family_folders, model_folders, tmp_path_factory):
    """family(name) -> (export folder, LLaVA folder, LLaVA export's warnings about an untied head): trained in this process, once per module.

    A family that fails keeps its error, raised again wherever it is asked for, so each
    failure names its family.
    """

    from mmtrain.export import export_llava
    from mmtrain.train import main

    root = tmp_path_factory.mktemp("lm-family-runs")
    runs: dict[str, tuple | Exception] = {}

    def run(family: str) -> tuple[str, str, list[str]]:
        if family not in runs:
            out = root / family
            flags = {
                "lm_model_name_or_path": family_folders(family),
                "vision_model_name_or_path": model_folders["tiny-clip"],
                "data_path": str(root / "data"),
                "synthetic_num_samples": 6,  # 5 train after the eval split: 3 steps of 2
                "per_device_train_batch_size": 2,
                "per_device_eval_batch_size": 4,
                "lang_lora_dim": 4,
                "learning_rate": 1e-2,
                "num_train_epochs": 1,
                "eval_generate": 0,
                "output_dir": str(out),
            }
            try:
                result = main([item for k, v in flags.items() for item in (f"--{k}", str(v))])
                assert result["global_step"] == 3, result
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    export_llava(str(out / "epoch-0"), str(out / "llava"))
                untied = [str(w.message) for w in caught if "untied copy" in str(w.message)]
                runs[family] = (str(out / "epoch-0"), str(out / "llava"), untied)
            except Exception as e:  # kept, and raised again for this family's tests
                runs[family] = e
            finally:
                # the Accelerator's state is process-wide: leave none behind for the next run
                reset_accelerate_state()
        if isinstance(runs[family], Exception):
            raise runs[family]
        return runs[family]

    return run


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    """A tiny model's steps are all overhead, which more threads on a busy machine multiply: one thread, here and in main."""
    threads, env = torch.get_num_threads(), {k: os.environ.get(k) for k in ("MMTRAIN_CPU_THREADS", "DS_ACCELERATOR")}
    os.environ["MMTRAIN_CPU_THREADS"] = "1"
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # what main sets on CPU
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


QUESTION = "What color is the shape?"

PLAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cases_path, out = sys.argv[1:3]
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for family, case in cases.items():
        try:
            model = AutoModelForImageTextToText.from_pretrained(case["llava"]).eval()
            processor = AutoProcessor.from_pretrained(case["llava"])
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=[Image.open(case["image"]).convert("RGB")], text=prompt, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
                torch.save(model(**inputs).logits[0], case["logits"])
            results[family] = {"prompt": inputs["input_ids"][0].tolist(), "ids": ids[0, inputs["input_ids"].shape[1]:].tolist()}
        except Exception as e:
            results[family] = {"error": f"{type(e).__name__}: {e}"}
    assert not any(m == "mmtrain" or m.startswith("mmtrain.") for m in sys.modules), "mmtrain was imported"
    with open(out, "w") as f:
        json.dump(results, f)
    """
)


def _mmtrain_answer(export: str, image: str, max_new_tokens: int) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, greedy new ids, the prompt's logits) of the reloaded export, prompted as mmtrain.generate prompts."""
    from mmtrain.generate import Chat, with_placeholders
    from mmtrain.model.generation import SamplingOptions, generate

    chat = Chat(export, options=SamplingOptions(max_new_tokens=max_new_tokens))
    built = chat.built
    prompt = chat.encode_prompt([{"role": "user", "text": with_placeholders(QUESTION, 1)}])
    tok = built.tokenizer
    pixels, _ = chat._pixels([image])
    ids = generate(built.model, [torch.tensor(prompt)], [pixels], eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, options=chat.options)[0]
    with torch.no_grad():
        logits = built.model(torch.tensor([prompt]), pixel_values=pixels, return_logits=True).logits[0]
    return prompt, ids, logits[:, : built.image_tokens.original_vocab_size]


@pytest.fixture(scope="module")
def plain_transformers_answers(trained_families, tmp_path_factory):
    """{family: what plain transformers answers from its LLaVA folder}, one subprocess for every family that trained."""
    from PIL import Image

    root = tmp_path_factory.mktemp("plain-transformers")
    image = root / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    cases = {}
    for family in FAMILIES:
        try:
            _, llava, _ = trained_families(family)
        except Exception:
            continue  # its own tests report it
        cases[family] = {"llava": llava, "question": QUESTION, "image": str(image), "max_new_tokens": 6,
                         "logits": str(root / f"{family}-logits.pt")}
    (root / "cases.json").write_text(json.dumps(cases))
    (root / "plain.py").write_text(PLAIN_SCRIPT)
    elsewhere = root / "elsewhere"  # outside the repository: mmtrain cannot be imported by accident
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, str(root / "plain.py"), str(root / "cases.json"), str(root / "answers.json")],
        cwd=elsewhere, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads((root / "answers.json").read_text())
    for family, answer in answers.items():
        if "error" not in answer:
            answer["logits"] = torch.load(cases[family]["logits"])
    return str(image), answers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_exports_with_no_family_flag(family, trained_families):
    from mmtrain.model.pretrained import load_pretrained

    export, llava, untied = trained_families(family)
    config = json.loads((Path(llava) / "config.json").read_text())
    lm_config = _family_config(family)
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == lm_config.model_type
    load_pretrained(export)  # strict: every tensor present, none unexpected
    # A tied head stays tied (Gemma, SmolLM3, Cohere, ...). LLaVA ties a head only to a table named embed_tokens:
    # Falcon's (word_embeddings) is written untied, said once.
    exported = json.loads((Path(export) / "language_model" / "config.json").read_text())
    assert exported["tie_word_embeddings"] == lm_config.tie_word_embeddings
    ties_elsewhere = exported["tie_word_embeddings"] and family in TABLE_NOT_EMBED_TOKENS
    assert len(untied) == (1 if ties_elsewhere else 0), untied
    assert config["text_config"]["tie_word_embeddings"] == (exported["tie_word_embeddings"] and not ties_elsewhere)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_transformers_answers_as_mmtrain_does(family, trained_families, plain_transformers_answers):
    export, _, _ = trained_families(family)
    image, answers = plain_transformers_answers
    got = answers[family]
    assert "error" not in got, got.get("error")
    prompt, expected, logits = _mmtrain_answer(export, image, max_new_tokens=6)
    assert got["prompt"] == prompt, "the LLaVA folder's chat template prompts otherwise than training"
    # every position: the image's framing tokens (new rows) and the image features feed all that follows
    torch.testing.assert_close(got["logits"][:, : logits.shape[1]], logits, rtol=1e-4, atol=1e-4)
    eos = 1
    body = got["ids"][: got["ids"].index(eos)] if eos in got["ids"] else got["ids"]
    assert body == expected and expected, (got["ids"], expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reloaded_export_computes_what_the_trained_model_computes(family, family_folders, tiny_args, tmp_path):
    """New-token rows, LoRA fused, the family's own embedding and head names: the export's logits are training's."""
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import load_pretrained, save_pretrained

    args = tiny_args(lm_model_name_or_path=family_folders(family), lang_lora_dim=4)
    torch.manual_seed(0)
    built = build_model(args)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    built.model.eval()
    span = built.image_tokens.span()  # <im_start>, the image's tokens, <im_end>: new rows on both sides
    ids = torch.tensor([[0, 5, *span, 9, 11, 13]])
    pixels = torch.randn(1, 3, built.model.vision.image_size, built.model.vision.image_size)
    save_pretrained(str(tmp_path / "export"), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
    reloaded = load_pretrained(str(tmp_path / "export"))
    with torch.no_grad():
        expected = built.model(ids, pixel_values=pixels, return_logits=True).logits
        got = reloaded.model(ids, pixel_values=pixels, return_logits=True).logits
    vocab = built.image_tokens.original_vocab_size
    torch.testing.assert_close(got[..., :vocab], expected[..., :vocab], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_neox", "falcon"])  # embed_tokens (tied or not), embed_in, word_embeddings
def test_a_new_run_starts_from_the_export_of_each_layout(family, trained_families, family_folders, tiny_args):
    """--init_from an export takes the projector and the new tokens' rows from the LM's own table name."""
    from safetensors.torch import load_file

    from mmtrain.model import build_model
    from mmtrain.model.pretrained import load_pretrained
    from mmtrain.training.init_from import check_source, load_parts

    export, _, _ = trained_families(family)
    config = tiny_args(lm_model_name_or_path=family_folders(family), lang_lora_dim=4)
    source = check_source(export, config, ["projector", "new_rows"])
    built = build_model(config)
    load_parts(built.model, source)
    for key, value in load_file(Path(export) / "projector.safetensors").items():
        torch.testing.assert_close(built.model.projector.state_dict()[key], value)
    trained = load_pretrained(export).model.language_model.get_input_embeddings()
    torch.testing.assert_close(built.model.language_model.get_input_embeddings().new_rows, trained.new_rows)
