"""What the LM is found to be from the model itself: its decoder layers (LoRA's auto scope, layer
checkpointing, ZeRO-3 leaves, float8) and the attention its class can run."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from mmtrain.model.attention import attention_for
from mmtrain.model.builder import check_model_config, lora_scope
from mmtrain.model.decoder_layers import checkpoint_first_layers, decoder_layer_scope, decoder_layers
from mmtrain.model.errors import ConfigError

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, pad_token_id=None)


def _lm(config_class: str, **extra):
    config = getattr(transformers, config_class)(**{**TINY, **extra})
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize(
    ("config_class", "extra", "scope"),
    [
        ("LlamaConfig", dict(intermediate_size=32, num_key_value_heads=1), "model.layers."),
        ("GPTNeoXConfig", dict(intermediate_size=32), "gpt_neox.layers."),
        ("FalconConfig", {}, "transformer.h."),  # no `layers`: the decoder's ModuleList of num_hidden_layers blocks
    ],
)
def test_decoder_layers_are_found_in_each_layout(config_class, extra, scope):
    lm = _lm(config_class, **extra)
    layers = decoder_layers(lm)
    assert len(layers) == 3 and decoder_layer_scope(lm) == scope
    assert lora_scope(lm, "auto") == scope and lora_scope(lm, "attn.") == "attn."  # a flag value stays an override
    assert checkpoint_first_layers(lm, 2) == [0, 1]
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False]


class _Decoder(nn.Module):
    """Blocks under an unusual name beside a shorter list of another kind (say, per-stage norms)."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(4) for _ in range(2))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(5))
        self.parts = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)] * 4)  # longer, but not one block class


class _LM(nn.Module):
    def __init__(self, layers: int | None):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_hidden_layers=layers) if layers else None
        self.body = _Decoder()

    def get_decoder(self):
        return self.body


def test_a_list_of_one_block_class_with_num_hidden_layers_entries_is_the_decoder():
    assert decoder_layer_scope(_LM(5)) == "body.blocks."
    assert decoder_layer_scope(_LM(2)) == "body.norms."  # the config's count decides between lists
    assert decoder_layer_scope(_LM(None)) == "body.blocks."  # else the longest


def test_a_model_without_a_list_of_layers_is_a_clear_error():
    with pytest.raises(ConfigError, match="has no list of decoder layers.*give lang_lora_module_name a scope"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_gemma2_runs_eager_attention_said_in_the_log(tiny_args, tmp_path, caplog):
    """Gemma 2 refuses SDPA by name: the default --attn_implementation sdpa builds it with eager, logged."""
    from mmtrain import presets
    from mmtrain.model import build_model

    assert attention_for(transformers.LlamaForCausalLM, "sdpa") == ("sdpa", None)
    chosen, why = attention_for(transformers.Gemma2ForCausalLM, "sdpa")
    assert chosen == "eager" and why.startswith("Gemma2ForCausalLM cannot run sdpa attention")

    config = transformers.Gemma2Config(**{**TINY, "vocab_size": presets.PRESET_TOKENIZER_VOCAB}, intermediate_size=32,
                                       num_key_value_heads=1, head_dim=8)
    AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(tmp_path / "gemma2")
    presets.build_preset_tokenizer().save_pretrained(tmp_path / "gemma2")
    args = tiny_args(lm_model_name_or_path=str(tmp_path / "gemma2"), lang_lora_dim=4)
    assert args.attn_implementation == "sdpa"
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        built = build_model(args)
    assert built.model.language_model.config._attn_implementation == "eager"
    assert "attention: Gemma2ForCausalLM cannot run sdpa attention" in caplog.text and "eager instead (--attn_implementation sdpa)" in caplog.text
    assert built.model.vision.tower.config._attn_implementation == "sdpa"  # the vision tower keeps what was asked
    ids = torch.tensor([[0, 5, 7]])
    assert built.model(ids, return_logits=True).logits.isfinite().all()

    # MMCA is made of SDPA calls, which would drop Gemma 2's capped logits: refused before any weights load
    with pytest.raises(ConfigError, match="^enable_mmca_attention: MMCA computes its attention through SDPA, and Gemma2ForCausalLM cannot run sdpa"):
        check_model_config(tiny_args(lm_model_name_or_path=str(tmp_path / "gemma2"), enable_mmca_attention=True))


@pytest.mark.parametrize("name", ["model.embed_tokens.base.weight", "gpt_neox.embed_in.base.weight", "transformer.word_embeddings.base.weight"])
def test_the_input_table_is_counted_as_embeddings_whatever_the_lm_calls_it(name):
    from mmtrain.model.counting import component_of

    assert component_of(f"language_model.{name}") == "LM input embeddings"
    assert component_of(f"language_model.{name.replace('base.weight', 'new_rows')}") == "new token embeddings"
