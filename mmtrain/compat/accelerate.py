"""accelerate internals: the DeepSpeed plugin's hand-over of its config to transformers, the gradient-sync flag."""

from __future__ import annotations


# --- accelerate + transformers: the DeepSpeed config transformers sees ------------------
#
# ``from_pretrained`` builds weights under ``deepspeed.zero.Init`` when transformers holds
# a ZeRO-3 config, which it keeps through a weak reference set by
# ``transformers.integrations.deepspeed.set_hf_deepspeed_config``; accelerate's
# ``DeepSpeedPlugin`` owns the referenced object as ``plugin.dschf`` and creates it in
# ``set_deepspeed_weakref()``. Neither is documented.


def zero3_init_enabled(plugin) -> bool:
    """Whether models are built partitioned (``zero.Init``) under accelerate's DeepSpeed ``plugin``.

    ``DeepSpeedPlugin.zero3_init_flag`` is documented as an input; we read it after the
    plugin has resolved it, relying on it being True only at ZeRO stage 3 (accelerate
    turns it off at other stages).
    """
    return bool(plugin.zero3_init_flag)


def reinstall_hf_deepspeed_config(plugin) -> None:
    """Hand transformers a fresh copy of ``plugin.deepspeed_config`` (what ``zero.Init`` will read).

    Needed after we edit the config following the Accelerator's creation (the stage-3
    persistence threshold), and to restore it after
    :func:`mmtrain.compat.transformers.unset_hf_deepspeed_config`.
    Dropping ``plugin.dschf`` first mirrors accelerate's own context manager; the new
    object must stay referenced by the plugin or transformers' weak reference dies.
    """
    plugin.dschf = None
    plugin.set_deepspeed_weakref()


def set_sync_gradients(accelerator, sync: bool) -> None:
    """Say whether the coming backward ends an optimizer step, as ``accelerator.accumulate`` would.

    The token-weighted loss reads a whole step's micro-batches before running the first
    (it needs their label count). ``accumulate`` decides the boundary from a step counter
    and from the loader having yielded its last batch, which the read-ahead reaches too
    early. Accelerate keeps the flag only behind the private
    ``GradientState._set_sync_gradients``; everything downstream reads it: the wrapped
    optimizer and schedule step only when it is set, and under DeepSpeed the engine's
    accumulation boundary and ``step`` follow it. Were it renamed this raises
    AttributeError at the first step, hence the test.
    """
    accelerator.gradient_state._set_sync_gradients(sync)
