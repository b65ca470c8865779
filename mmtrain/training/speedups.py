"""The speed flags, wired into training: each is one named step that the set-up or the loop calls.

========================================  ==========  =========================================
flag                                      default     what it changes
========================================  ==========  =========================================
``--packing``                             off         train collator packs samples into rows
``--max_tokens_per_batch N``              off         micro-batches of whole samples within N
                                                      tokens, packed into one row (see
                                                      mmtrain/data/token_budget.py)
``--pad_to_multiple_of``                  auto        padded lengths rounded up (64 on a GPU)
``--cache_vision_features``               off         loop swaps pixels for cached features
``--vision_cache_dir``                    memory      where those features live
``--vision_cache_max_gb``                 auto        most an in-memory cache may hold
``--gradient_checkpointing_layers N``     0           checkpoint only the first N LM layers
``--torch_compile``                       auto        compile each LM decoder layer (auto: on
                                                      for CUDA)
``--fused_lora``                          on          LoRA's scale and adds inside the GEMMs
``--fp8_base`` / ``--fp8_vision``         off         frozen Linears in float8 (not the same
                                                      numbers: see mmtrain/model/fp8.py)
``--quantize_base`` / ``--quantize_vision`` none      frozen Linears in 4-bit NF4 (not the
                                                      same numbers: mmtrain/model/nf4.py)
(always, plain mixed precision)                       LoRA inputs stay in the autocast dtype
========================================  ==========  =========================================

Each but float8 and NF4 keeps the loss of the plain path (tests/model/test_speed_features.py,
tests/data/test_packing.py). The model options are decided here (:func:`speed_options`)
and applied by the model's builder.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from mmtrain.args import ConfigError
from mmtrain.data.collator import BatchCollator, Collator
from mmtrain.data.packing import PackingCollator
from mmtrain.data.preference import PairCollator, PairPackingCollator, SharedPromptCollator
from mmtrain.model.builder import BuiltModel
from mmtrain.model import attention, fp8, sequence_parallel, shared_prompt, varlen_attention
from mmtrain.model.config import SpeedOptions
from mmtrain.model.fp8 import Float8FrozenLinear
from mmtrain.model.nf4 import NF4FrozenLinear
from mmtrain.model.vision_cache import ImageKeyCollator, VisionFeatureCache
from mmtrain.training import distributed
from mmtrain.training.engine_view import unwrap_vlm

logger = logging.getLogger("mmtrain")


def shares_prompt(built: BuiltModel, model_args, train_args, device: torch.device | str = "cpu") -> bool:
    """Whether this run's preference pairs hold their prompt once (``--dpo_share_prompt``, :mod:`mmtrain.model.shared_prompt`).

    On a GPU only through FlashAttention-2's variable-length kernel: without it (32-bit
    activations, a GPU before Ampere) the rows would need a dense ``[L, L]`` mask each,
    and the halves as rows keep their causal kernel instead. On a CPU the mask is what
    packed rows use anyway.
    """
    if train_args.objective != "dpo" or not train_args.dpo_share_prompt:
        return False
    why_not = shared_prompt.can_share(built.model.language_model.config, model_args.enable_mmca_attention)
    if not why_not and torch.device(device).type == "cuda" and not varlen_attention.uses_varlen(built.model.language_model):
        why_not = "FlashAttention-2's variable-length kernel cannot run here, and a dense mask per row would take its place"
    if why_not:
        logger.info(f"DPO: each pair's prompt is computed twice (once per answer), not once: {why_not}")
        return False
    logger.info("DPO: each pair's prompt is computed once, its two answers as branches of it (--dpo_share_prompt)")
    return True


def pair_collator(pad: int, multiple: int | None, share_prompt: bool, capacity: int | None = None) -> BatchCollator:
    """Preference pairs' collator: shared-prompt rows, or the halves as rows (packed into one under a token budget)."""
    if share_prompt:
        return SharedPromptCollator(pad, multiple, capacity)
    return PairPackingCollator(pad, capacity, multiple) if capacity else PairCollator(pad, multiple)


def make_train_collator(
    built: BuiltModel, model_args, data_args, pairs: bool = False, row_multiple: int = 1, share_prompt: bool = False,
) -> BatchCollator:
    """Padding (default) or packing; with the vision cache, image digests are taken in the workers.

    ``pairs``: preference pairs (:func:`pair_collator`), one micro-batch per row under a
    token budget. ``row_multiple``: rows are also padded to a multiple of it (a
    sequence-parallel group's size).
    """
    pad = built.tokenizer.pad_token_id
    multiple = math.lcm(data_args.padding_multiple(), row_multiple)
    if data_args.packing or data_args.max_tokens_per_batch:
        try:
            attention.check_packed_attention(built.model.language_model.config)
        except ValueError as err:
            raise ConfigError(f"--packing / --max_tokens_per_batch: {err}") from None
    if data_args.max_tokens_per_batch:
        images = f", at most {data_args.max_images_per_batch} images" if data_args.max_images_per_batch else ""
        what = "whole pairs (both answers)" if pairs else "whole samples"
        logger.info(f"token budget: each micro-batch packs {what} into one row of up to {data_args.max_tokens_per_batch} tokens{images}")
        if pairs:
            collator = pair_collator(pad, multiple, share_prompt, data_args.max_tokens_per_batch)
        else:
            collator = PackingCollator(pad, data_args.max_tokens_per_batch, multiple)
    elif pairs:
        collator = pair_collator(pad, multiple, share_prompt)
    elif data_args.packing:
        logger.info(f"packing: each batch's samples share rows of up to {data_args.max_seq_len} tokens")
        collator = PackingCollator(pad, data_args.max_seq_len, multiple)
    else:
        collator = Collator(pad, multiple)
    if model_args.cache_vision_features:
        collator = ImageKeyCollator(collator)
    return collator


def speed_options(accelerator, train_args, data_args) -> SpeedOptions:
    """What the builder switches on for this run, decided from the flags, the device and the ZeRO stage.

    At ZeRO-3 each LM decoder layer is a leaf module of the engine (:func:`zero3_leaf_layers`):
    its weights are gathered once on entry, so fused LoRA reads them whole, and the
    compiled code is each layer's ``forward`` with the gather hooks eager around it.
    """
    zero3 = distributed.zero_stage(accelerator) == 3
    plain_mixed_precision = accelerator.mixed_precision in ("bf16", "fp16") and distributed.deepspeed_plugin(accelerator) is None
    return SpeedOptions(
        fused_lora=train_args.fused_lora,
        compile_decoder_layers=should_compile(accelerator.device, train_args),
        compile_hooks_outside=zero3,
        gradient_checkpointing=train_args.gradient_checkpointing,
        gradient_checkpointing_layers=train_args.gradient_checkpointing_layers,
        lora_inputs_follow_autocast=plain_mixed_precision,
        packed_attention=packed_attention(accelerator, data_args, train_args),
        fp8_base=train_args.fp8_base,
        fp8_vision=train_args.fp8_vision,
        # The originals are what exports are written from, and only the main process writes them.
        fp8_keep_originals=accelerator.is_main_process,
        fp8_device=accelerator.device,
        nf4_base=train_args.quantize_base == "nf4",
        nf4_vision=train_args.quantize_vision == "nf4",
        nf4_device=accelerator.device,
    )


def check_fp8(accelerator, train_args) -> None:
    """Refuse ``--fp8_base`` / ``--fp8_vision`` where they cannot run; each entry point calls it once its
    Accelerator exists, before any weights load.

    At ZeRO-3 DeepSpeed partitions every parameter and gathers it in the compute dtype
    around each forward and backward; a float8 weight with its separate scales is not
    something its partitioning, gathering or checkpoint consolidation handles. Without a
    CUDA GPU of compute capability >= 8.9 there are no float8 tensor cores.
    """
    flags = [f"--{name}" for name in ("fp8_base", "fp8_vision") if getattr(train_args, name)]
    if not flags:
        return
    if distributed.zero_stage(accelerator) == 3:
        raise ConfigError(
            f"{' and '.join(flags)} cannot run at ZeRO-3: DeepSpeed partitions the parameters and gathers them in the "
            "compute dtype around each layer, and float8 partitions (weights with separate scales) are not supported; "
            "use ZeRO 0-2 (e.g. accelerate_configs/zero2.yaml) or drop the flag"
        )
    problem = fp8.float8_matmul_problem(accelerator.device)
    if problem:
        raise ConfigError(f"{' and '.join(flags)} needs float8 tensor cores, but {problem}")


def packed_attention(accelerator, data_args, train_args) -> str | None:
    """The LM kernel for this run's token-budget rows (``--packed_attention``; :func:`mmtrain.model.attention.packed_kernel`).

    Under sequence parallelism every row, packed or not, takes a varlen kernel, which
    DeepSpeed's Ulysses attention wraps (:mod:`mmtrain.model.sequence_parallel`). Preference
    pairs with their prompt once are packed rows too (:mod:`mmtrain.model.shared_prompt`).
    """
    if train_args.sequence_parallel_size > 1:
        return sequence_parallel.split_kernel(accelerator.device, distributed.compute_dtype(accelerator))
    shared = train_args.objective == "dpo" and train_args.dpo_share_prompt
    return attention.packed_kernel(
        train_args.packed_attention, accelerator.device, distributed.compute_dtype(accelerator), bool(data_args.max_tokens_per_batch) or shared
    )


def check_quantize(accelerator, train_args) -> None:
    """Refuse ``--quantize_base`` / ``--quantize_vision`` where they cannot run, once the Accelerator exists and
    before any weights load.

    At ZeRO-3 DeepSpeed partitions every parameter and gathers it in the compute dtype:
    4-bit codes with block scales kept beside them are neither partitioned nor gathered by
    it. On a device the installed bitsandbytes has no NF4 kernels for (a probe runs one
    small product forward and backward there), nothing could train.
    """
    flags = [f"--{name} nf4" for name in ("quantize_base", "quantize_vision") if getattr(train_args, name) == "nf4"]
    if not flags:
        return
    given = " and ".join(flags)
    if distributed.zero_stage(accelerator) == 3:
        raise ConfigError(
            f"{given} cannot run at ZeRO-3: DeepSpeed would partition and gather the 4-bit codes without their block "
            "scales; use ZeRO 0-2 (e.g. accelerate_configs/zero2.yaml), which with a 4-bit base leaves little to partition"
        )
    from mmtrain.model.nf4 import nf4_problem

    problem = nf4_problem(accelerator.device)
    if problem:
        raise ConfigError(f"{given}: {problem}; train on a CUDA GPU or drop the flag")


def should_compile(device: torch.device, train_args) -> bool:
    """``--torch_compile true/false`` as given; ``auto`` (default): on for CUDA training (said in the log).

    Compilation measured +16% (eager 10,700 -> 12,418) tokens/s on ref-7b at 2048 tokens,
    +27% with MMCA (benchmarks/README.md); on CPU it costs more start-up than it returns
    on short runs.
    """
    compile_layers = compiles(device, train_args)
    if compile_layers and train_args.torch_compile == "auto":
        logger.info("torch.compile: on by default for CUDA (--torch_compile false turns it off)")
    elif torch.device(device).type == "cuda" and train_args.torch_compile == "auto":
        logger.info("torch.compile: off under --sequence_parallel_size (the attention's all-to-all runs inside each layer)")
    return compile_layers


def compiles(device: torch.device, train_args) -> bool:
    """Whether a run on ``device`` compiles its decoder layers (:func:`should_compile`'s decision, without the log line)."""
    if train_args.torch_compile != "auto":
        return train_args.torch_compile == "true"
    return torch.device(device).type == "cuda" and train_args.sequence_parallel_size == 1


def zero3_leaf_layers(accelerator, built: BuiltModel) -> int:
    """At ZeRO-3, make each LM decoder layer one unit of DeepSpeed's parameter gathering; returns how many.

    DeepSpeed otherwise hooks every sub-module (about 20 per LLaMA layer with LoRA, each
    gathering its own weight): with a layer as a leaf module (DeepSpeed's public
    ``set_z3_leaf_modules``, made for this) one hook gathers the whole layer before its
    forward and again before its backward. Must run before ``accelerator.prepare``.
    """
    if distributed.zero_stage(accelerator) != 3:
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    from mmtrain.model.decoder_layers import decoder_layers

    lm = built.model.language_model
    layers = decoder_layers(lm)
    set_z3_leaf_modules(lm, [type(layers[0])])
    logger.info(f"ZeRO-3: {len(layers)} LM decoder layers each gathered whole ({type(layers[0]).__name__} as a leaf module)")
    return len(layers)


def available_host_memory() -> int | None:
    """Bytes of host memory available for new allocations (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_vision_cache_size(accelerator, model_args, train_records: list[dict]) -> None:
    """Refuse an in-memory feature cache the training images would outgrow, before any weights load.

    The cache keeps one ``[patches, width]`` feature tensor in the compute dtype per
    distinct image, in every process (about 1.2 MB a CLIP-L/336 image in bf16: hundreds
    of GB for LLaVA's 558K pre-training images). The bound is ``--vision_cache_max_gb``,
    or half the host memory available now, shared by this machine's processes.
    """
    if not model_args.cache_vision_features or model_args.vision_cache_dir is not None:
        return
    from mmtrain.memory.facts import GiB, model_facts

    images = len({path for record in train_records for path in record.get("images") or ()})
    facts = model_facts(model_args)
    per_image = facts.patches * facts.vision_hidden * torch.finfo(distributed.compute_dtype(accelerator)).bits // 8
    needed = images * per_image
    if model_args.vision_cache_max_gb is not None:
        limit, bound = int(model_args.vision_cache_max_gb * GiB), f"--vision_cache_max_gb {model_args.vision_cache_max_gb:g}"
    else:
        available = available_host_memory()
        if available is None:
            return
        processes = distributed.local_process_count(accelerator)
        limit = available // 2 // processes
        bound = f"half the {available / GiB:.1f} GB of host memory available, shared by {processes} process(es) on this machine"
    if needed > limit:
        raise ConfigError(
            f"--cache_vision_features would keep {images:,} images x {_size(per_image)} = {_size(needed)} of features in memory "
            f"in each process, more than {bound} ({_size(limit)}); keep them on disk with --vision_cache_dir DIR, or raise "
            "--vision_cache_max_gb"
        )
    logger.info(f"vision feature cache in memory: up to {images:,} images x {_size(per_image)} = {_size(needed)} per process")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.2f} MB"


def make_vision_cache(accelerator, model, model_args, output_dir: str) -> VisionFeatureCache | None:
    """The frozen vision feature cache the loop applies to each training batch, or None when off."""
    if not model_args.cache_vision_features:
        return None
    vlm = unwrap_vlm(accelerator, model)
    if vlm.vision_trainable:
        raise ConfigError("--cache_vision_features needs a frozen vision encoder (--vis_lora_dim 0)")
    directory = model_args.vision_cache_dir
    if directory is not None and not os.path.isabs(directory):
        directory = os.path.join(output_dir, directory)
    identity = {
        "vision_model_name_or_path": model_args.vision_model_name_or_path,
        "vision_feature_layer": model_args.vision_feature_layer,
        "vision_keep_cls": model_args.vision_keep_cls,
        "preset_seed": model_args.preset_seed,
        "dtype": str(next(vlm.vision.parameters()).dtype),
    }
    if model_args.vision_model_name_or_path_2:
        identity["vision_model_name_or_path_2"] = model_args.vision_model_name_or_path_2  # absent for one encoder, so older caches still match
    if any(isinstance(m, Float8FrozenLinear) for m in vlm.vision.modules()):
        identity["fp8_vision"] = True  # other features than the bf16 tower's; absent otherwise, so older caches still match
    if any(isinstance(m, NF4FrozenLinear) for m in vlm.vision.modules()):
        identity["nf4_vision"] = True  # likewise
    return VisionFeatureCache(vlm.encode_images, directory=directory, identity=identity)


def encode_with_cache(cache: VisionFeatureCache | None, batch: dict) -> dict:
    """The loop's hook: the batch as the model takes it, images encoded at most once per run."""
    return batch if cache is None else cache.apply(batch)

