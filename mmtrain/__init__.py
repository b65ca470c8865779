"""mmtrain: train vision-language models from a frozen vision encoder and a frozen causal LM.

The package reads as the architecture: ``model/`` (vision encoder -> projector ->
language model), ``data/`` (records -> template -> dataset -> collator), ``training/``
(accelerator, loop, checkpoints), and the commands ``train``, ``budget``, ``memory``,
``generate`` and ``export``. Below both ``model/`` and ``data/`` lie the contracts they
share (``batch``, ``image_tokens``) and ``compat/``, the one place that reaches into other
libraries' internals; ``tests/test_layering.py`` keeps imports going down that tree.
"""

__version__ = "0.1.0"


from mmtrain.compat import bitsandbytes as _bitsandbytes_compat  # noqa: E402

_bitsandbytes_compat.quiet_bitsandbytes_cpu_notice()  # before peft imports bitsandbytes (mmtrain/compat/bitsandbytes.py says why)


def load_pretrained(path: str, **kwargs):
    """Load an export (``OUTPUT/epoch-N``) for inference; see :func:`mmtrain.model.pretrained.load_pretrained`."""
    from mmtrain.model.pretrained import load_pretrained as _load

    return _load(path, **kwargs)
