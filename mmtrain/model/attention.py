"""Which attention implementation a model is built with: the one asked for, or eager where its class cannot run it.

``--attn_implementation`` (sdpa by default) is a request. Some transformers classes
refuse SDPA outright: Gemma 2 caps its attention logits, which SDPA cannot do, and
transformers raises "does not support ... scaled_dot_product_attention yet" when SDPA
is asked for by name. Such a model is built with eager attention instead, and the log
says so. Eager computes the same function on every device; flex attention could cap
the logits too, but on a CPU it needs a compiler toolchain, and on a GPU the packed
rows of a token budget switch such LMs to flex attention anyway
(:func:`mmtrain.model.builder.apply_speed_options`).

The decision is made here, from the model class alone, before any weights load; the
saved config keeps the request, so a reloaded export decides the same way.
"""

from __future__ import annotations

import logging

import transformers

from mmtrain.compat import transformers as transformers_compat

logger = logging.getLogger("mmtrain")

FALLBACK = "eager"


def attention_for(model_class: type, requested: str) -> tuple[str, str | None]:
    """``(implementation, why)``: ``requested`` if ``model_class`` can run it (``why`` is None), else eager and the reason."""
    if transformers_compat.supports_attention(model_class, requested):
        return requested, None
    return FALLBACK, f"{model_class.__name__} cannot run {requested} attention in transformers {transformers.__version__}"


def choose_attention(model_class: type, requested: str, flag: str = "--attn_implementation") -> str:
    """:func:`attention_for`'s choice, logged when it is not the one requested."""
    chosen, why = attention_for(model_class, requested)
    if why:
        logger.info(f"attention: {why}; {chosen} instead ({flag} {requested})")
    return chosen
