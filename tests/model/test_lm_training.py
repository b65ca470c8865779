"""What the LM trains (--lm_training): each mode's gradients reach exactly its parameters; exports hold the trained LM."""

import pytest
import torch

from mmtrain.args import ConfigError, ModelArguments
from mmtrain.model import build_model
from mmtrain.model.builder import check_model_config
from mmtrain.model.pretrained import export_config, load_pretrained, save_pretrained

from .test_vlm import _batch

LAYERS = 4  # tiny-llama's decoder layers


def _expected(names: list[str], mode: str, *, layers=(), embeddings=False, head=False) -> set[str]:
    """The trainable set, written from the names alone (not from the builder's rule)."""
    always = {n for n in names if n.startswith("projector.") or n.endswith("embed_tokens.new_rows")}
    lm = [n for n in names if n.startswith("language_model.") and not n.endswith("new_rows")]
    table, out = "language_model.model.embed_tokens.base.weight", "language_model.lm_head.weight"
    if mode == "lora":
        picked = {n for n in lm if ".lora_" in n}
    elif mode == "full":
        picked = set(lm) - {table, out}
    elif mode == "last_layers":
        picked = {n for n in lm if any(f".layers.{i}." in n for i in layers)} | {"language_model.model.norm.weight"}
    else:
        picked = set()
    if embeddings:
        picked.add(table)
    if head:
        picked.add(out)
    return always | picked


CASES = {
    "frozen": (dict(lm_training="frozen"), dict(mode="frozen")),
    "auto is frozen without LoRA": (dict(), dict(mode="frozen")),
    "lora": (dict(lm_training="lora", lang_lora_dim=4), dict(mode="lora")),
    "full": (dict(lm_training="full"), dict(mode="full", embeddings=True, head=True)),
    "full, table and head frozen": (
        dict(lm_training="full", train_full_embeddings=False, train_lm_head=False), dict(mode="full")
    ),
    "last layer": (dict(lm_training="last_layers", lm_trainable_layers=1), dict(mode="last_layers", layers=(3,))),
    "last two layers and the head": (
        dict(lm_training="last_layers", lm_trainable_layers=2, train_lm_head=True),
        dict(mode="last_layers", layers=(2, 3), head=True),
    ),
    "LoRA and the embedding table": (
        dict(lang_lora_dim=4, train_full_embeddings=True), dict(mode="lora", embeddings=True)
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_reaches_exactly_the_trainable_set(tiny_args, case):
    flags, expect = CASES[case]
    built = build_model(tiny_args(**flags))
    model = built.model
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected(names, **expect)

    torch.manual_seed(0)
    model(**_batch(built)).loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert reached == trainable
    # and it is a real gradient: every trained module moved (LoRA A has none while B is 0)
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n in trainable if "lora_A" not in n} <= nonzero


@pytest.mark.parametrize(
    "flags,says",
    [
        (dict(lm_training="full", lang_lora_dim=4), "--lm_training full and --lang_lora_dim 4 contradict"),
        (dict(lm_training="lora"), "--lm_training lora needs --lang_lora_dim > 0"),
        (dict(lm_training="last_layers"), "needs --lm_trainable_layers >= 1"),
        (dict(lm_trainable_layers=2), "--lm_trainable_layers is only used with --lm_training last_layers"),
        (dict(lm_training="full", only_optimize_lora=True, vis_lora_dim=2), "--only_optimize_lora and --lm_training full"),
        (dict(lm_training="everything"), "--lm_training 'everything': valid are"),
    ],
)
def test_contradictory_lm_settings_are_named(flags, says):
    with pytest.raises(ConfigError, match=says):
        ModelArguments(lang_lora_dim=flags.pop("lang_lora_dim", 0), **flags)


def test_the_model_config_names_fields_and_the_command_line_names_flags():
    from mmtrain.model.config import VLMConfig

    with pytest.raises(ConfigError) as below:
        VLMConfig(lm_training="lora", lang_lora_dim=0)
    assert str(below.value) == "lm_training lora needs lang_lora_dim > 0" and "lm_training" in below.value.fields
    with pytest.raises(ConfigError) as cli:
        ModelArguments(lm_training="lora", lang_lora_dim=0)
    assert str(cli.value) == "--lm_training lora needs --lang_lora_dim > 0"


def test_flags_replace_fields_only_where_a_field_stands_as_a_word():
    from mmtrain.args import naming_flags

    error = ConfigError("vis_proj 'x': vlm_name_or_path '/models/vis_proj' and vlm_name_or_path vis_proj/config.json", fields=("vis_proj", "vlm_name_or_path"))
    assert str(naming_flags(error)) == "--vis_proj 'x': --vlm_name_or_path '/models/vis_proj' and --vlm_name_or_path vis_proj/config.json"
    # a run-time option whose flag has another name, and a second encoder's field beside the first's
    assert str(naming_flags(ConfigError("compile_decoder_layers: no", fields=("compile_decoder_layers",)))) == "--torch_compile: no"
    both = ConfigError("vision_model_name_or_path 'a' and vision_model_name_or_path_2 'b'", fields=("vision_model_name_or_path", "vision_model_name_or_path_2"))
    assert str(naming_flags(both)) == "--vision_model_name_or_path 'a' and --vision_model_name_or_path_2 'b'"
    plain = ConfigError("--init_from x: no such folder")
    assert naming_flags(plain) is plain


def test_more_trained_layers_than_the_lm_has_is_caught_before_weights(tiny_args, tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=f"^lm_trainable_layers 5: the LM has only {LAYERS} decoder layers"):
        check_model_config(tiny_args(lm_training="last_layers", lm_trainable_layers=5))
    # the same check, reached from training's command line, names the flag
    from mmtrain.train import cli

    flags = ["--lm_model_name_or_path", "tiny-llama", "--lang_lora_dim", "0", "--lm_training", "last_layers", "--lm_trainable_layers", "5"]
    monkeypatch.setattr("sys.argv", ["mmtrain.train", *flags, "--output_dir", str(tmp_path / "out")])
    assert cli() == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: --lm_trainable_layers 5: the LM has only {LAYERS} decoder layers"


def test_export_of_a_fully_trained_lm_holds_its_weights(tmp_path, tiny_args):
    """Every LM weight moved in training is what the export's language model holds; it loads as a plain model."""
    args = tiny_args(lm_training="full")
    built = build_model(args)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    built.model.eval()
    folder = tmp_path / "export"
    save_pretrained(str(folder), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)

    config, _ = export_config(str(folder))
    assert config.lm_mode == "frozen" and not config.train_lm_head and not config.train_full_embeddings
    reloaded = load_pretrained(str(folder)).model
    trained = built.model.language_model.state_dict()
    got = reloaded.language_model.state_dict()
    for key in ("model.layers.0.mlp.down_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(got[key], trained[key])
    # the trained table, with the image tokens' rows written into it
    table = trained["model.embed_tokens.base.weight"].clone()
    first = built.image_tokens.original_vocab_size
    new_rows = trained["model.embed_tokens.new_rows"]
    table[first : first + len(new_rows)] = new_rows
    torch.testing.assert_close(got["model.embed_tokens.base.weight"][: len(table)], table)

    # transformers' own LLaVA written from that export holds the same full LM weights
    from transformers import LlavaForConditionalGeneration

    from mmtrain.export import export_llava

    llava_dir = tmp_path / "llava"
    export_llava(str(folder), str(llava_dir))
    llava = LlavaForConditionalGeneration.from_pretrained(str(llava_dir)).state_dict()
    torch.testing.assert_close(llava["lm_head.weight"], got["lm_head.weight"])
    lm_keys = [k for k in llava if k.endswith("layers.3.self_attn.q_proj.weight") and "vision" not in k]
    assert len(lm_keys) == 1
    torch.testing.assert_close(llava[lm_keys[0]], trained["model.layers.3.self_attn.q_proj.weight"])
