"""DeepSpeed internals: ZeRO-3 parameter attributes, where its optimizers keep state and masters, its memory estimators,
its Ulysses attention's registration.

deepspeed itself is imported only inside the functions that need it: its import is slow
and must come after ``DS_ACCELERATOR`` is set
(:func:`mmtrain.training.distributed.prepare_environment`). The estimators are DeepSpeed's
own functions, resolved lazily by the module ``__getattr__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmtrain.compat import lazy_attributes

if TYPE_CHECKING:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: F401
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: F401


# --- DeepSpeed: ZeRO-3 parameter attributes ---------------------------------------------
#
# ZeRO-3 (``deepspeed.zero.Init``) turns each parameter into a local shard, ``numel() ==
# 0`` outside a gather, and records the full tensor's facts in ``ds_*`` attributes. They
# are read by getattr because a plain parameter has none of them.


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 partitioned parameter (gathered by DeepSpeed's hooks, not whole).

    Every partitioned parameter carries ``ds_id``. Read by fused LoRA, which must fall
    back to peft's forward there (the base weight is gathered around ``base_layer``'s
    own forward), and by the new-token embedding, which must gather before reading
    rows. Were it renamed, both would take a partitioned weight for a whole one.
    """
    return hasattr(param, "ds_id")


def zero3_gathered(param: torch.Tensor) -> bool:
    """Whether ``param`` holds its whole value now: not partitioned, or gathered by ZeRO-3 at this moment.

    A partitioned parameter's local tensor is empty outside a gather and has its full
    shape (``ds_shape``) inside one, e.g. within a decoder layer marked as a ZeRO-3 leaf
    module, whose pre-forward hook gathers every weight of the layer at once. Read by
    fused LoRA, which uses the base weight directly instead of calling ``base_layer``.
    """
    shape = getattr(param, "ds_shape", None)
    return shape is None or param.shape == shape


def full_numel(param: torch.Tensor) -> int:
    """Element count of the whole parameter, also when ZeRO-3 holds only a shard of it.

    A partitioned parameter's ``numel()`` is its (empty) local view; ``ds_numel`` is the
    full count. Were it renamed, parameter counts (logs, budgets) would read 0 at ZeRO-3.
    """
    return int(getattr(param, "ds_numel", param.numel()))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter, also when ZeRO-3 holds only a shard of it (``ds_shape``).

    Read by the portable checkpoint state, which writes each tensor's shape before any
    value is gathered; were it renamed, ZeRO-3 shapes would be written empty.
    """
    return tuple(getattr(param, "ds_shape", param.shape))


def partition(param: torch.Tensor) -> torch.Tensor:
    """This process's share of a ZeRO-3 partitioned parameter (``ds_tensor``): what every gather of it reads.

    A ZeRO-3 forward gathers each weight from the processes' partitions into the
    parameter's own (otherwise empty) tensor; the optimizer updates the partitions, which
    are views into its flat buffers. The DPO reference points each trained parameter's
    partition at a copy of its starting share for its forward, and back
    (:mod:`mmtrain.training.reference`). Were it renamed, that swap would raise on the
    missing attribute; the compat test checks that a forward gathers from it.
    """
    return param.ds_tensor


def release_gathered(engine) -> None:
    """Partition again every parameter a ZeRO-3 engine holds gathered (persistent and prefetched ones too).

    ZeRO-3 keeps some weights gathered between forwards: small ones always
    (``stage3_param_persistence_threshold``), others when they will be used again soon
    (``stage3_max_reuse_distance``), and the prefetcher gathers ahead of use. After the
    partitions behind them change (the DPO reference's swap), a forward must gather
    afresh: this is the stage-3 optimizer's ``empty_partition_cache`` (the engine's
    public one also runs ``gc.collect`` and empties the device cache, too slow per
    micro-batch). Were it renamed, the reference would raise; were it to stop releasing,
    the compat test sees the stale values.
    """
    engine.optimizer.empty_partition_cache()


# --- optimizer state behind Accelerate's and DeepSpeed's wrappers ---------------------
#
# A resume on another process count writes each trainable parameter's Adam moments and
# step back into a freshly built engine. DeepSpeed's public setters
# (``deepspeed.utils.safe_set_full_optimizer_state``) write into state that must already
# exist, and ZeRO 1/2 and the bf16 optimizer create it at their first step. The helpers
# below create it as that first step would.


def base_optimizer(optimizer):
    """The optimizer that holds the Adam state: torch's AdamW or DeepSpeed's CPU Adam.

    Accelerate's ``AcceleratedOptimizer`` keeps what it wraps as ``.optimizer``; under
    DeepSpeed that is the ZeRO (or bf16) optimizer, which keeps the base optimizer as
    ``.optimizer`` too; the base optimizer has no such attribute. Were either renamed, this
    would return a wrapper and :func:`mmtrain.training.adam_state.create_adam_state` would raise on its missing state.
    """
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def fp32_masters(optimizer) -> dict[int, tuple[torch.Tensor, int]]:
    """Where DeepSpeed's ZeRO-0 mixed-precision optimizers keep each parameter's fp32 master.

    ``{id(param): (tensor the base optimizer steps, offset of the parameter in it)}``.
    At ZeRO 0 with bf16 or fp16, DeepSpeed wraps the optimizer in ``FP16_Optimizer``
    (fused: one flat fp32 copy per group, ``fp32_groups_flat``, the parameters
    ``fp16_groups[i]`` laid out in order without padding) or ``FP16_UnfusedOptimizer``
    (one fp32 copy per parameter, ``fp32_groups``). Neither links parameters to their
    masters for ``safe_get_full_fp32_param``, which returns None there. Empty for any
    other optimizer. Were the attributes renamed, a resume on another count would read
    the compute-dtype weights and no moments; the compat test compares the masters with
    the weights to catch that.
    """
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "fp16_groups"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is None:
        return {}
    found = {}
    if hasattr(wrapper, "fp32_groups_flat"):
        for group, flat in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat):
            offset = 0
            for p in group:
                found[id(p)] = (flat, offset)
                offset += p.numel()
    elif hasattr(wrapper, "fp32_groups"):
        for group, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            found.update({id(p): (m, 0) for p, m in zip(group, masters)})
    return found


def link_zero_optimizer_state(optimizer) -> None:
    """Point a ZeRO 1/2 or bf16 optimizer's per-parameter views at the base optimizer's state.

    ``_lazy_init_hp_params_optimizer_state`` is what those optimizers run after their
    first step, once (the ``_hp_optimizer_states_linked`` flag keeps it from running
    again); DeepSpeed's ``safe_get/set_full_optimizer_state`` read and write through the
    views it makes. DeepSpeed 0.19 runs it after stepping the *first* parameter group, when
    the other groups have no state yet, so their parameters get no views and
    ``safe_get_full_optimizer_state`` raises "exp_avg not found" for them. Clearing the
    flag and linking again once every group has state makes the views for all; it only
    creates views, so training is unchanged. ZeRO-3 reads the base state directly and has
    no such method. Were either name changed, the getters would raise as above; the
    compat test catches that first.
    """
    wrapper = optimizer
    while wrapper is not None and not hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper = getattr(wrapper, "optimizer", None)
    if wrapper is not None:
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


# --- DeepSpeed: Ulysses sequence parallelism (ALST) ---------------------------------------
#
# ``UlyssesSPAttentionHF.register_with_transformers`` is DeepSpeed's documented entry point,
# but what it does reaches into transformers: it replaces the function registered under the
# LM's attention implementation in ``ALL_ATTENTION_FUNCTIONS`` (process-wide) with a wrapper
# that exchanges heads for positions around it, and it creates the group in the module
# globals of ``deepspeed.runtime.sequence_parallel.parallel_state_sp``, once per process. The
# wrapper drops any 4D mask (positions tell the samples apart), gathers ``position_ids``
# from the group and calls the original function on the whole sequence with the layer's
# other keyword arguments unchanged. A release that changes the registration, the group
# module or what reaches the original function breaks sequence parallelism, which the
# two-process test of ``tests/training/test_sequence_parallel.py`` shows.


def ulysses_problem() -> str | None:
    """Why this DeepSpeed cannot run the Ulysses attention as :func:`register_ulysses` uses it (None: it can)."""
    import inspect

    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    except ImportError as err:
        return f"DeepSpeed's Ulysses attention (deepspeed >= 0.18) cannot be imported: {err}"
    if "disable_in_eval" not in inspect.signature(UlyssesSPAttentionHF.register_with_transformers).parameters:
        return "this DeepSpeed's Ulysses attention cannot step aside in evaluation (no disable_in_eval); install deepspeed >= 0.18.5"
    return None


def register_ulysses(language_model, implementation: str, size: int, micro_batch: int):
    """Route ``language_model``'s attention (``implementation``, already set on it) through Ulysses over groups of ``size``.

    Every process calls it at the same point (it creates the process groups). Returns
    ``(group, rank in it)``. Evaluation (the module in eval mode) bypasses the exchange:
    each process then runs whole rows of its own.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=language_model,
        core_attn_implementation=implementation,
        sequence_parallel_size=size,
        micro_batch_size=micro_batch,
        seq_length_is_variable=True,
        disable_in_eval=True,
    )
    return mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()


def _estimate_zero2():
    # DeepSpeed's memory estimator, the form taking a parameter count instead of a model
    # (the documented ..._all_live variants need the model); returns (cpu_bytes, gpu_bytes).
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs


def _estimate_zero3():
    # As above for ZeRO-3, taking the largest layer's parameter count too; returns
    # (cpu_bytes, gpu_bytes, largest_layer_bytes).
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return estimate_zero3_model_states_mem_needs


_LAZY = {
    "estimate_zero2_model_states_mem_needs": _estimate_zero2,
    "estimate_zero3_model_states_mem_needs": _estimate_zero3,
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
