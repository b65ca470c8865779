"""Presets: the language presets' configs name their tokenizer's special tokens."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmtrain.presets import build_preset_tokenizer, preset_config, preset_names, seeded_init


@pytest.fixture(scope="module")
def tokenizer():
    return build_preset_tokenizer()


@pytest.mark.parametrize("name", preset_names("language"))
def test_language_presets_name_their_tokenizers_special_tokens(tokenizer, name):
    """generate() and exports read the config's ids: they must be the tokenizer's."""
    config = preset_config(name)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<s>", "</s>", "<pad>"]
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    # no pad id in the config: it would zero that embedding row at initialisation
    assert config.pad_token_id is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_token_ids_leave_a_presets_weights_as_they_were(name):
    """The ids are config only: the seeded weights (and so the embedded default's run) are unchanged."""
    config = preset_config(name)
    defaults = type(config)()  # the ids the preset had before it named its tokenizer's
    old = preset_config(name)
    old.bos_token_id, old.eos_token_id = defaults.bos_token_id, defaults.eos_token_id
    assert (old.bos_token_id, old.eos_token_id) != (config.bos_token_id, config.eos_token_id)
    states = []
    for c in (old, config):
        with seeded_init(0):
            states.append(AutoModelForCausalLM.from_config(c).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
