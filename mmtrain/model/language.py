"""The causal language model, its tokenizer, and trainable rows for the new tokens."""

from __future__ import annotations

import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from mmtrain import presets
from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.compat import transformers as transformers_compat
from mmtrain.model.attention import attention_for, choose_attention
from mmtrain.model.errors import ConfigError
from mmtrain.model.hf_loading import checked_from_pretrained


def load_language_config(name_or_path: str, field: str = "lm_model_name_or_path") -> PretrainedConfig:
    """The LM's config; any architecture ``AutoModelForCausalLM`` knows is accepted."""
    if presets.is_preset(name_or_path):
        return presets.preset_config(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field} {name_or_path!r}: cannot read a Hugging Face config: {e}", fields=(field,)) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"{field} {name_or_path!r} holds a {type(config).__name__}, which has no causal-LM class in transformers "
            "(LLaMA, Qwen2, Mistral, ... are supported)",
            fields=(field,),
        )
    return config


def causal_lm_class(config: PretrainedConfig) -> type:
    """The transformers class ``AutoModelForCausalLM`` builds for ``config``."""
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def language_attention(config: PretrainedConfig, requested: str) -> tuple[str, str | None]:
    """The attention implementation the LM of ``config`` is built with, and why it is not ``requested`` (None: it is)."""
    return attention_for(causal_lm_class(config), requested)


def load_tokenizer(name_or_path: str):
    if presets.is_preset(name_or_path):
        return presets.build_preset_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"lm_model_name_or_path {name_or_path!r} has no loadable tokenizer: {e}", fields=("lm_model_name_or_path",)) from None


def build_language_model(
    model_args,
    *,
    dtype: torch.dtype,
    config: PretrainedConfig | None = None,
    strict: bool = False,
    weights: bool = True,
    preset_device: torch.device | None = None,
) -> nn.Module:
    """Load the LM from its folder (or a preset with seeded random weights).

    Its attention is ``attn_implementation`` where the LM's class supports it, else
    eager, said in the log (:mod:`mmtrain.model.attention`).

    Under an active ZeRO-3 config (Accelerate sets one before we are called) both
    paths construct the weights partitioned through ``deepspeed.zero.Init``.
    ``preset_device`` is where a preset's random weights are drawn (see
    :func:`mmtrain.presets.seeded_init`).
    """
    name = model_args.lm_model_name_or_path
    config = config or load_language_config(name)
    attention = choose_attention(causal_lm_class(config), model_args.attn_implementation)
    if presets.is_preset(name) or not weights:  # weights=False: shapes only (the meta device)
        with presets.seeded_init(model_args.preset_seed, preset_device if weights else None):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    return checked_from_pretrained(
        AutoModelForCausalLM,
        name,
        field="lm_model_name_or_path",
        strict_unexpected=strict,
        dtype=dtype,
        attn_implementation=attention,
    )


def _is_partitioned(param: nn.Parameter) -> bool:
    return deepspeed_compat.is_zero3_partitioned(param)


class NewTokenEmbedding(nn.Module):
    """The LM's input embedding table, frozen, with separately trainable rows for new tokens.

    Ids ``first_new_id .. first_new_id + num_new - 1`` read ``new_rows``; all others read
    the frozen ``base`` table, including ids past the new ones (an LM's vocabulary is often
    padded beyond its tokenizer's): the export keeps those rows as they are, so the model
    reloaded from it reads what this one reads, should such an id ever be generated.
    Only ``new_rows`` gets gradients and optimizer state, so adding three tokens to a
    32k x 4096 table trains 12k parameters instead of 131M.
    """

    def __init__(self, base: nn.Embedding, first_new_id: int, num_new: int, init_std: float):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.num_new = num_new
        rows = torch.empty(num_new, base.embedding_dim, dtype=base.weight.dtype, device=base.weight.device)
        if rows.device.type != "meta":
            init = self._rows_already_in_table(base, first_new_id, num_new)
            if init is not None:
                rows.copy_(init)
            else:
                rows.normal_(0.0, init_std)
        self.new_rows = nn.Parameter(rows)

    @staticmethod
    def _rows_already_in_table(base: nn.Embedding, first: int, num: int) -> torch.Tensor | None:
        """Rows for the new ids the table already holds (a reloaded export): start from them."""
        if first + num > base.num_embeddings:
            return None
        weight = base.weight
        if _is_partitioned(weight):
            import deepspeed

            with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
                return weight.data[first : first + num].clone()
        return weight.data[first : first + num].clone()

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads ``embed_tokens.weight`` for dtype/device checks.
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = (input_ids >= self.first_new_id) & (input_ids < self.first_new_id + self.num_new)
        base_ids = input_ids.masked_fill(is_new, 0)
        out = self.base(base_ids)
        new_index = (input_ids - self.first_new_id).clamp(0, self.num_new - 1)
        new = nn.functional.embedding(new_index, self.new_rows).to(out.dtype)
        scale = transformers_compat.embedding_scale(self.base)
        if scale is not None:  # Gemma's tables scale what they look up: the new rows, read from the table once exported, too
            new = new * scale.to(out.dtype)
        return torch.where(is_new[..., None], new, out)
