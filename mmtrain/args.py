"""Typed arguments: the one source of truth for every flag.

Each field carries its default and its help text; ``__post_init__`` checks what can be
checked from the value alone, and :func:`validate_paths` checks what needs the disk.
Both run before any weights load. The command line is generated from these classes by
transformers' ``HfArgumentParser``; a YAML or JSON file given with ``--config`` supplies
the same fields, and flags on the command line override it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Literal, Optional

import yaml

from mmtrain import presets
from mmtrain.cli import FlagParser

from mmtrain.model.config import PROJECTORS, VLMConfig  # noqa: F401  (PROJECTORS: re-exported for callers)
from mmtrain.model.errors import ConfigError  # one error class for flags and model settings


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


# Fields of the model's run-time options (``SpeedOptions``) whose flag has another name.
FLAG_OF_FIELD = {"compile_decoder_layers": "torch_compile"}


def naming_flags(error: ConfigError) -> ConfigError:
    """``error`` as the command line says it: each config field it names written as its flag.

    A field is rewritten where it stands as a word of the message (after a space or a
    parenthesis, or first), not inside a path or a quoted value that happens to hold its
    name. An error that names no fields is returned as it is.
    """
    if not error.fields:
        return error
    message = str(error)
    for name in error.fields:
        flag = "--" + FLAG_OF_FIELD.get(name, name)
        message = re.sub(rf"(?<![^\s(]){re.escape(name)}(?![\w/-]|\.\w)", flag, message)
    return ConfigError(message).with_traceback(error.__traceback__)


def flags_in_errors(entry):
    """A command line's entry point whose configuration errors name flags, not config fields.

    What the model package raises speaks of its config's fields (:class:`ConfigError`
    ``fields``); a command that takes flags rewrites them once, here, at its entry point.
    """

    @functools.wraps(entry)
    def run(*args, **kwargs):
        try:
            return entry(*args, **kwargs)
        except ConfigError as e:
            if not e.fields:
                raise
            raise naming_flags(e) from None

    return run


@dataclass
class ModelArguments(VLMConfig):
    """The model flags: every field of :class:`VLMConfig` (what the model is), plus how training feeds it."""

    cache_vision_features: bool = field(
        default=False,
        metadata=_help("Encode each training image once and reuse its features every epoch (needs a frozen encoder: --vis_lora_dim 0)."),
    )
    vision_cache_dir: Optional[str] = field(
        default=None,
        metadata=_help("Keep --cache_vision_features on disk in this folder (relative: under --output_dir) instead of in memory."),
    )
    vision_cache_max_gb: Optional[float] = field(
        default=None,
        metadata=_help("Most GB of features the in-memory --cache_vision_features may hold per process; a run whose images need "
                       "more is refused at start (default: half the host memory available, shared by this machine's processes)."),
    )

    def __post_init__(self):
        try:
            super().__post_init__()
        except ConfigError as e:
            raise naming_flags(e) from None
        if self.cache_vision_features and self.vis_lora_dim > 0:
            raise ConfigError(
                f"--cache_vision_features needs a frozen vision encoder, but --vis_lora_dim {self.vis_lora_dim} trains it "
                "(its features change every step); drop one of the two"
            )
        if self.cache_vision_features and self.vision_max_patches:
            raise ConfigError(
                "--cache_vision_features keeps one fixed-size feature block per image, and --vision_max_patches gives each "
                "image its own grid; drop one of the two"
            )
        if self.vision_cache_max_gb is not None and self.vision_cache_max_gb <= 0:
            raise ConfigError(f"--vision_cache_max_gb must be > 0, got {self.vision_cache_max_gb}")
        if self.vision_cache_dir is not None and not self.cache_vision_features:
            raise ConfigError("--vision_cache_dir is only used with --cache_vision_features; pass both or neither")


DATASET_COLUMN_KEYS = ("messages", "images", "role", "content", "user", "assistant", "system")


@dataclass
class DataArguments:
    dataset_names: list[str] = field(
        default_factory=lambda: ["synthetic"],
        metadata=_help(
            "Training data, each one of: a JSON/JSONL file (LLaVA or messages format), a Parquet or Arrow file, a folder "
            "written by Dataset/DatasetDict.save_to_disk (or of data files datasets reads), a Hub dataset name as "
            "datasets.load_dataset left it in the local cache (read without the network), or a registered name (synthetic). "
            "Images may be paths or embedded datasets.Image values."
        ),
    )
    dataset_split: str = field(
        default="train", metadata=_help("The split taken from a save_to_disk DatasetDict folder or a cached Hub dataset.")
    )
    dataset_columns: list[str] = field(
        default_factory=list,
        metadata=_help(
            "Column names of datasets in another layout, as KEY=VALUE pairs: messages=COLUMN (the list of turns), "
            "images=COLUMN, role=KEY and content=KEY (each turn's keys), user=VALUE, assistant=VALUE, system=VALUE "
            "(role values), e.g. --dataset_columns messages=dialog images=pictures role=speaker content=text user=customer "
            "assistant=agent. Default: LLaVA 'conversations' (from/value) or 'messages' (role/content), images in "
            "'image'/'images'."
        ),
    )
    dataset_samples: list[str] = field(
        default_factory=lambda: ["all"], metadata=_help("Samples taken from each dataset: a count or 'all', one per dataset.")
    )
    image_folder: list[str] = field(
        default_factory=list, metadata=_help("Folder of the images: one for all datasets or one per dataset (default: the file's folder).")
    )
    data_path: str = field(default="data/generated", metadata=_help("Where generated datasets are written."))
    eval_dataset_names: list[str] = field(default_factory=list, metadata=_help("Separate eval files (default: split off --eval_ratio)."))
    eval_ratio: float = field(default=0.1, metadata=_help("Share of the training data held out for eval when no eval file is given."))
    max_seq_len: int = field(default=2048, metadata=_help("Longest sample in tokens, image tokens counted."))
    overlength_policy: Literal["drop", "truncate_turns"] = field(
        default="drop", metadata=_help("What happens to longer samples: drop (counted) or truncate whole turns from the end.")
    )
    dataset_concatenate_samples: int = field(
        default=1, metadata=_help("Join 1..N random samples into one multi-image conversation (1: off).")
    )
    max_num_image_per_sample: int = field(default=8, metadata=_help("Most images in one sample after concatenation."))
    max_frames: int = field(
        default=8,
        metadata=_help(
            "Most frames sampled from one video (a clip file or a list of frame images): spread uniformly over it, or "
            "taken at --video_fps and then thinned uniformly to this many. Each frame is one vision-encoder input."
        ),
    )
    video_fps: float = field(
        default=0.0,
        metadata=_help("Frames per second sampled from a clip file, up to --max_frames (0: --max_frames spread uniformly over the clip)."),
    )
    template: Literal["plain", "chat"] = field(
        default="plain", metadata=_help("plain: '### Question:/### Answer:' template; chat: the tokenizer's chat template.")
    )
    system_prompt: str = field(default="", metadata=_help("Optional system prompt put before every conversation."))
    on_bad_sample: Literal["error", "skip"] = field(
        default="error", metadata=_help("A missing or corrupt image: stop (error) or skip the record and count it (skip).")
    )
    num_workers: int = field(
        default=-1,
        metadata=_help(
            "DataLoader worker processes per training process. -1: 4 on a GPU (fewer when the machine has fewer CPU cores "
            "per process), 0 on CPU and for --streaming. With --streaming each worker reads its own part of the process's "
            "shards, with its own shuffle buffer."
        ),
    )
    synthetic_num_samples: int = field(default=3000, metadata=_help("Size of the generated synthetic dataset."))
    packing: bool = field(
        default=False,
        metadata=_help(
            "Pack each training batch's samples into as few rows of --max_seq_len tokens as fit, instead of padding "
            "(every sample still attends only to itself; the batch size still counts samples)."
        ),
    )
    max_tokens_per_batch: Optional[int] = field(
        default=None,
        metadata=_help(
            "Token budget of each training micro-batch, per process, image tokens counted: as many whole samples as "
            "fit, packed into one row, each attending only to itself (replaces --per_device_train_batch_size; the "
            "loss, as with sample batches, is one mean over the answer tokens of each optimizer step). "
            "Longer samples follow --overlength_policy."
        ),
    )
    max_image_tokens: Optional[int] = field(
        default=None,
        metadata=_help(
            "Most image tokens in one sample, every image's span counted (with AnyRes tiles or --vision_max_patches each "
            "image's own count, from its size); samples with more follow --overlength_policy (counted)."
        ),
    )
    max_images_per_batch: Optional[int] = field(
        default=None,
        metadata=_help("With --max_tokens_per_batch: most images in one micro-batch (the vision encoder's batch); samples with more follow --overlength_policy."),
    )

    streaming: bool = field(
        default=False,
        metadata=_help(
            "Read --dataset_names as globs of JSONL, Parquet or Arrow shard files (images as paths or embedded datasets.Image "
            "values, read from the shard when a sample is encoded) or WebDataset .tar shards (key.json + key.jpg/.png, the "
            "images read from the tar), streamed: nothing is loaded up front, each process "
            "reads its own shards, and a resume continues from the exact sample. Needs --max_steps and --eval_dataset_names."
        ),
    )
    shuffle_buffer_size: int = field(default=1000, metadata=_help("With --streaming: records in the seeded shuffle buffer."))

    pad_to_multiple_of: int = field(
        default=0,
        metadata=_help(
            "Round each padded batch's length (with --packing or a token budget: each packed row's) up to a multiple "
            "of this (1: no rounding; 0: 64 on a GPU, 1 on CPU). "
            "Fewer distinct shapes: kernels planned or compiled per shape are reused instead of rebuilt for every "
            "new length (+24%% tokens/s on a first pass over variable-length data on an H100)."
        ),
    )

    def __post_init__(self):
        if self.pad_to_multiple_of < 0:
            raise ConfigError(f"--pad_to_multiple_of must be >= 0, got {self.pad_to_multiple_of}")
        if self.max_seq_len < 8:
            raise ConfigError(f"--max_seq_len must be >= 8, got {self.max_seq_len}")
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ConfigError(f"--eval_ratio must be in [0, 1), got {self.eval_ratio}")
        if self.dataset_concatenate_samples < 1:
            raise ConfigError(f"--dataset_concatenate_samples must be >= 1, got {self.dataset_concatenate_samples}")
        if len(self.dataset_samples) not in (1, len(self.dataset_names)):
            raise ConfigError(
                f"--dataset_samples has {len(self.dataset_samples)} values for {len(self.dataset_names)} --dataset_names; give one or one each"
            )
        for value in self.dataset_samples:
            if value != "all" and not (value.isdigit() and int(value) > 0):
                raise ConfigError(f"--dataset_samples value {value!r} is neither 'all' nor a positive count")
        if self.max_frames < 1:
            raise ConfigError(f"--max_frames must be >= 1, got {self.max_frames}")
        if self.video_fps < 0:
            raise ConfigError(f"--video_fps must be >= 0 (0: uniform), got {self.video_fps}")
        if self.num_workers < -1:
            raise ConfigError(f"--num_workers must be >= 0, or -1 for the default, got {self.num_workers}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 8:
            raise ConfigError(f"--max_tokens_per_batch must be >= 8, got {self.max_tokens_per_batch}")
        if self.max_image_tokens is not None and self.max_image_tokens < 1:
            raise ConfigError(f"--max_image_tokens must be >= 1, got {self.max_image_tokens}")
        if self.max_images_per_batch is not None:
            if self.max_tokens_per_batch is None:
                raise ConfigError("--max_images_per_batch is a limit of --max_tokens_per_batch batches; pass both or neither")
            if self.max_images_per_batch < 1:
                raise ConfigError(f"--max_images_per_batch must be >= 1, got {self.max_images_per_batch}")
        if self.max_tokens_per_batch is not None and self.packing:
            raise ConfigError("--max_tokens_per_batch already packs each micro-batch into one row; drop --packing")
        if self.streaming:
            self._check_streaming()
        self.column_map()  # checked once here
        if len(self.image_folder) not in (0, 1, len(self.dataset_names)):
            raise ConfigError(
                f"--image_folder has {len(self.image_folder)} values for {len(self.dataset_names)} --dataset_names; give none, one, or one each"
            )

    def _check_streaming(self) -> None:
        """What a stream cannot do yet (each needs the whole dataset at hand), refused naming the flag."""
        unsupported = {
            "--dataset_concatenate_samples": self.dataset_concatenate_samples > 1,
            "--dataset_samples": self.dataset_samples != ["all"],
        }
        for flag, given in unsupported.items():
            if given:
                raise ConfigError(f"{flag} is not supported with --streaming yet; drop one of them")
        if not self.eval_dataset_names:
            raise ConfigError("--streaming cannot hold out an --eval_ratio of a stream; give the eval files with --eval_dataset_names")
        if self.shuffle_buffer_size < 1:
            raise ConfigError(f"--shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")

    def column_map(self) -> dict[str, str]:
        """``--dataset_columns`` as a dict (empty: the default layouts)."""
        mapping = {}
        for pair in self.dataset_columns:
            key, sep, value = pair.partition("=")
            if not sep or not value or key not in DATASET_COLUMN_KEYS:
                raise ConfigError(
                    f"--dataset_columns {pair!r}: expected KEY=VALUE with KEY one of {', '.join(DATASET_COLUMN_KEYS)}"
                )
            mapping[key] = value
        return mapping

    def longest_sample(self) -> int:
        """The longest sample kept, image tokens counted: --max_seq_len, or the token budget if that is smaller."""
        return min(self.max_seq_len, self.max_tokens_per_batch or self.max_seq_len)

    def most_images(self) -> int:
        """The most images one sample may keep: --max_num_image_per_sample, or the image budget if that is smaller."""
        return min(self.max_num_image_per_sample, self.max_images_per_batch or self.max_num_image_per_sample)

    def token_budget(self) -> str | None:
        """The token budget's flags as one string (a checkpoint records it), or None when batches count samples."""
        if not self.max_tokens_per_batch:
            return None
        images = f" --max_images_per_batch {self.max_images_per_batch}" if self.max_images_per_batch else ""
        return f"--max_tokens_per_batch {self.max_tokens_per_batch}{images}"

    def padding_multiple(self) -> int:
        """``--pad_to_multiple_of`` resolved: 0 means 64 where a GPU trains, 1 (no rounding) on CPU."""
        if self.pad_to_multiple_of:
            return self.pad_to_multiple_of
        import torch

        return 64 if torch.cuda.is_available() else 1


# Optimizer component -> the prefix of its --X_learning_rate / --X_weight_decay flags.
COMPONENT_FLAGS = {"projector": "projector", "vision": "vision", "lm_lora": "lm_lora", "lm": "lm"}
INIT_PARTS = ("projector", "new_rows", "lm_lora", "vision_lora")


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/default", metadata=_help("Where checkpoints, exports and logs go."))
    overwrite_output_dir: bool = field(default=False, metadata=_help("Allow an output folder that holds a different run."))
    per_device_train_batch_size: int = field(default=16, metadata=_help("Micro-batch per process."))
    per_device_eval_batch_size: int = field(default=32, metadata=_help("Eval batch per process."))
    learning_rate: float = field(
        default=2e-4,
        metadata=_help(
            "Peak learning rate of everything that trains and has no rate of its own: the projector, LoRA "
            "(LM and vision), the LM's own weights under --lm_training full/last_layers, and the new token rows "
            "and embedding table (unless --learning_rate_pretraining_components is given). The --X_learning_rate "
            "flags override it per component. LLaVA-1.5: 2e-4 for LoRA, 2e-5 for the whole LM, 1e-3 for stage 1's projector."
        ),
    )
    learning_rate_pretraining_components: Optional[float] = field(
        default=None, metadata=_help("Learning rate of parameters with 'embed' in their name (default: --learning_rate).")
    )
    weight_decay: float = field(default=0.0, metadata=_help("Weight decay (never on biases and norm weights)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW's beta1 (LLaVA: 0.9)."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW's beta2 (LLaVA: 0.999)."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW's epsilon."))
    projector_learning_rate: Optional[float] = field(default=None, metadata=_help("Learning rate of the projector (default: --learning_rate)."))
    projector_weight_decay: Optional[float] = field(default=None, metadata=_help("Weight decay of the projector (default: --weight_decay)."))
    vision_learning_rate: Optional[float] = field(
        default=None, metadata=_help("Learning rate of what trains in the vision encoder, its LoRA (default: --learning_rate).")
    )
    vision_weight_decay: Optional[float] = field(default=None, metadata=_help("Weight decay of the vision encoder's LoRA (default: --weight_decay)."))
    lm_lora_learning_rate: Optional[float] = field(default=None, metadata=_help("Learning rate of the LM's LoRA (default: --learning_rate)."))
    lm_lora_weight_decay: Optional[float] = field(default=None, metadata=_help("Weight decay of the LM's LoRA (default: --weight_decay)."))
    lm_learning_rate: Optional[float] = field(
        default=None,
        metadata=_help("Learning rate of the LM's own weights with --lm_training full/last_layers, head included (default: --learning_rate)."),
    )
    lm_weight_decay: Optional[float] = field(default=None, metadata=_help("Weight decay of the LM's own weights (default: --weight_decay)."))
    embedding_weight_decay: Optional[float] = field(
        default=None, metadata=_help("Weight decay of the new token rows and the embedding table (default: --weight_decay).")
    )
    init_from: Optional[str] = field(
        default=None,
        metadata=_help(
            "Start from an earlier run's trained parts: an export (OUTPUT/epoch-N) or a checkpoint "
            "(OUTPUT/checkpoints/step-N); data, schedule and optimizer start afresh. See --init_parts. "
            "(A transformers LLaVA folder is a whole model: --vlm_name_or_path.)"
        ),
    )
    init_parts: list[str] = field(
        default_factory=lambda: ["projector", "new_rows"],
        metadata=_help(
            "What --init_from takes: projector, new_rows (the image tokens' embedding rows), lm_lora, vision_lora "
            "(adapters: from a checkpoint; an export has them fused)."
        ),
    )
    num_train_epochs: int = field(default=1, metadata=_help("Epochs."))
    max_steps: int = field(default=-1, metadata=_help("Stop after this many optimizer steps (-1: run all epochs)."))
    gradient_accumulation_steps: Optional[int] = field(
        default=None, metadata=_help("Micro-batches per optimizer step (default: the Accelerate/DeepSpeed config, else 1).")
    )
    max_grad_norm: Optional[float] = field(
        default=None, metadata=_help("Gradient clipping (default: the DeepSpeed config's gradient_clipping, else 1.0).")
    )
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata=_help("Learning-rate schedule."))
    num_warmup_steps: float = field(
        default=0.03, metadata=_help("Warmup: a step count (> 1) or a ratio of all optimizer steps (<= 1; exactly 1 means all steps).")
    )
    seed: int = field(default=42, metadata=_help("Seed of data order, splits, sampling and initialisation."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute LM (and vision LoRA) activations in backward."))
    gradient_checkpointing_layers: int = field(
        default=0,
        metadata=_help(
            "Checkpoint only the first N decoder layers of the LM (turns checkpointing on; 0: every layer with "
            "--gradient_checkpointing, none without)."
        ),
    )
    torch_compile: Literal["auto", "true", "false"] = field(
        default="auto",
        metadata=_help(
            "Compile each decoder layer of the LM with torch.compile (regional compilation). auto: on when "
            "training on a CUDA GPU (+16%% tokens/s on ref-7b, +27%% with MMCA), off otherwise."
        ),
    )
    packed_attention: Literal["auto", "flash_varlen", "flex_attention", "sdpa"] = field(
        default="auto",
        metadata=_help(
            "LM attention for the packed rows of --max_tokens_per_batch on a CUDA GPU. auto: FlashAttention-2's "
            "variable-length kernel (each sample its own sequence) where it runs, else flex_attention (a document mask "
            "that skips the blocks across samples); sdpa: SDPA under the whole row's mask. CPU runs always take sdpa."
        ),
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata=_help(
            "Split each micro-batch's row across this many processes (sequence parallelism through DeepSpeed's Ulysses "
            "attention): each computes the LM on 1/N of the positions, so activation memory per GPU is divided by N. "
            "The N processes of a group train on the same micro-batch, so the data (and a --max_tokens_per_batch "
            "budget) is per group. Needs a DeepSpeed config, a process count N divides, an LM whose attention heads "
            "N divides, and one row per micro-batch (--max_tokens_per_batch, or --per_device_train_batch_size 1)."
        ),
    )
    fused_lora: bool = field(
        default=True,
        metadata=_help(
            "Run each LoRA layer as one node whose adds happen inside the matrix products (same numbers as peft's "
            "forward; layers it does not cover, e.g. with LoRA dropout or at ZeRO-3, keep peft's)."
        ),
    )
    fp8_base: bool = field(
        default=False,
        metadata=_help(
            "Hold the LM decoder layers' frozen Linear weights in float8 (one byte each, per-output-channel scales "
            "computed once) and run their forward and input-gradient products on float8 tensor cores; LoRA, the "
            "projector, embeddings and lm_head stay bfloat16. Needs a CUDA GPU of compute capability >= 8.9 and "
            "ZeRO 0-2; layers whose widths are not multiples of 16 stay bfloat16. Exports keep the original weights."
        ),
    )
    fp8_vision: bool = field(
        default=False, metadata=_help("As --fp8_base, for the frozen Linears of the vision tower (same requirements).")
    )
    quantize_base: Literal["none", "nf4"] = field(
        default="none",
        metadata=_help(
            "nf4: hold the LM decoder layers' frozen Linear weights in 4 bits (bitsandbytes' NF4, double-quantised block "
            "scales: 4.127 bits a weight), computing in bfloat16, under LoRA (QLoRA). Needs bitsandbytes "
            "(pip install 'mmtrain[qlora]') and ZeRO 0-2; not with --fp8_base or --lm_training full. Exports hold the "
            "dequantised weights with LoRA merged, in full precision."
        ),
    )
    quantize_vision: Literal["none", "nf4"] = field(
        default="none",
        metadata=_help(
            "nf4: as --quantize_base, for the frozen Linears of the vision tower (a few hundred MB saved; its features, "
            "which the projector reads, change with it: off unless memory is that tight)."
        ),
    )
    objective: Literal["sft", "dpo"] = field(
        default="sft",
        metadata=_help(
            "sft: next-token loss on the answers. dpo: preference tuning on pairs ('chosen'/'rejected' answers to one "
            "prompt) against the policy at the start of training (the reference)."
        ),
    )
    dpo_beta: float = field(default=0.1, metadata=_help("With --objective dpo: the reward scale beta (DPO's KL strength)."))
    dpo_loss: Literal["sigmoid", "ipo", "length_normalized"] = field(
        default="sigmoid",
        metadata=_help("With --objective dpo: sigmoid (DPO), ipo, or length_normalized (sigmoid on per-token log-ratios)."),
    )
    dpo_sft_weight: float = field(
        default=0.0, metadata=_help("With --objective dpo: weight of the chosen answer's per-token NLL added to the loss (RPO; 0: off).")
    )
    dpo_share_prompt: bool = field(
        default=True,
        metadata=_help(
            "With --objective dpo: lay each pair out as its prompt once and the two answers as branches of it, so the "
            "images, question and earlier turns are computed once per pair instead of twice (the same numbers; off where "
            "the LM attends within a sliding window, caps its logits, or runs MMCA, and on GPUs where FlashAttention-2 "
            "cannot run, as the log says)."
        ),
    )
    precompute_ref: bool = field(
        default=False,
        metadata=_help(
            "With --objective dpo: compute the reference's log-probabilities of every training and held-out pair once, "
            "before training (kept on the host, 8 bytes a pair, and in each checkpoint), so each step runs the policy's "
            "forward only; the reference's starting copies (with --lm_training full, a copy of the LM) are then freed."
        ),
    )
    enable_tensorboard: bool = field(default=False, metadata=_help("Write TensorBoard logs under output_dir/tensorboard."))
    logging_steps: int = field(default=10, metadata=_help("Log every N optimizer steps."))
    eval_steps: int = field(default=0, metadata=_help("Also evaluate every N optimizer steps (0: only at epoch ends)."))
    save_steps: int = field(default=0, metadata=_help("Also checkpoint every N optimizer steps (0: only at epoch ends)."))
    save_total_limit: int = field(default=2, metadata=_help("Checkpoints kept (the newest)."))
    export_each_epoch: bool = field(default=True, metadata=_help("Write a Hugging Face-format export at each epoch end."))
    resume_from_checkpoint: Optional[str] = field(default=None, metadata=_help("'latest' or a checkpoint folder."))
    eval_generate: int = field(
        default=0,
        metadata=_help(
            "Held-out questions answered by greedy generation at each eval, scored by exact match (0: off; "
            "the processes share them)."
        ),
    )
    max_new_tokens: int = field(default=16, metadata=_help("Generation length for --eval_generate."))
    record_samples: bool = field(
        default=False,
        metadata=_help(
            "Write the dataset indices of every training micro-batch to output_dir/samples/rank-N.jsonl "
            "(epoch, step, indices): which samples each process saw, e.g. across a resume."
        ),
    )
    verbose: bool = field(
        default=False,
        metadata=_help(
            "Also show the libraries' own lines while checkpoints and exports are written (Accelerate's "
            "'Saving current state' and one line per file, transformers' and huggingface_hub's); without it, one line each."
        ),
    )

    def __post_init__(self):
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "logging_steps"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ConfigError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        for flag in COMPONENT_FLAGS:
            for kind in ("learning_rate", "weight_decay"):
                value = getattr(self, f"{flag}_{kind}")
                if value is not None and (value < 0 or (kind == "learning_rate" and value == 0)):
                    raise ConfigError(f"--{flag}_{kind} must be {'> 0' if kind == 'learning_rate' else '>= 0'}, got {value}")
        unknown = sorted(set(self.init_parts) - set(INIT_PARTS))
        if unknown:
            raise ConfigError(f"--init_parts {' '.join(unknown)}: valid parts are {', '.join(INIT_PARTS)}")
        if self.learning_rate_pretraining_components is None:
            self.learning_rate_pretraining_components = self.learning_rate
        if self.num_warmup_steps < 0 or (self.num_warmup_steps > 1 and self.num_warmup_steps != int(self.num_warmup_steps)):
            raise ConfigError(f"--num_warmup_steps must be a ratio in [0, 1] or a whole step count > 1, got {self.num_warmup_steps}")
        for flag in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, flag) < 1.0:
                raise ConfigError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"--adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.save_total_limit < 1:
            raise ConfigError(f"--save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"--max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.gradient_checkpointing_layers < 0:
            raise ConfigError(f"--gradient_checkpointing_layers must be >= 0, got {self.gradient_checkpointing_layers}")
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"--sequence_parallel_size must be >= 1, got {self.sequence_parallel_size}")
        if self.dpo_beta <= 0:
            raise ConfigError(f"--dpo_beta must be > 0, got {self.dpo_beta}")
        if self.dpo_sft_weight < 0:
            raise ConfigError(f"--dpo_sft_weight must be >= 0, got {self.dpo_sft_weight}")


ALL_ARGUMENTS = (ModelArguments, DataArguments, TrainArguments)


def component_settings(train_args: TrainArguments) -> dict[str, dict]:
    """Per-component optimizer settings (``mmtrain.training.optim.param_groups``'s ``components``)."""
    settings = {
        name: {"lr": getattr(train_args, f"{flag}_learning_rate"), "weight_decay": getattr(train_args, f"{flag}_weight_decay")}
        for name, flag in COMPONENT_FLAGS.items()
    }
    settings["embed"] = {"weight_decay": train_args.embedding_weight_decay}  # its rate: the seed's "embed" groups
    return settings


def _file_to_argv(path: str) -> list[str]:
    """Turn a YAML/JSON argument file into flags, naming the file and key on any error."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path) as f:
        try:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {path}: cannot parse: {e}") from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    known = {f.name: f for cls in ALL_ARGUMENTS for f in fields(cls)}
    argv: list[str] = []
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if isinstance(value, bool):
            argv += [f"--{key}", str(value)]
        elif isinstance(value, list):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif value is None:
            continue
        else:
            argv += [f"--{key}", str(value)]
    return argv


# The embedded default's recipe: the demo's own hyper-parameters (the flags' defaults are a real run's).
EMBEDDED_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny", "default.yaml")
# Flags that name a model or data of one's own: with any of them (or --config) the run is not the embedded default.
OWN_RUN_FLAGS = ("--config", "--lm_model_name_or_path", "--vision_model_name_or_path", "--dataset_names", "--eval_dataset_names")

DESCRIPTION = f"""Train a vision-language model.

  accelerate launch [--config_file accelerate_configs/X.yaml] mmtrain/train.py [flags]
  python -m mmtrain.train [flags]

The defaults below are a real run's (LLaVA-1.5's LoRA stage 2: learning rate 2e-4, LoRA
scale 2, AdamW betas 0.9/0.999, one epoch). Without --config, a model or data flag
({', '.join(OWN_RUN_FLAGS[1:])}) it trains the embedded default, the tiny presets on a
generated dataset, whose settings recipes/tiny/default.yaml holds (flags given still win).
"""


def training_parser():
    """The parser of training's flags: every field of :data:`ALL_ARGUMENTS`, and ``--config``."""
    parser = FlagParser(ALL_ARGUMENTS, prog="python -m mmtrain.train", description=DESCRIPTION)
    # Read by parse_args before the parser runs (the file's values come first, flags override
    # them); declared here so that --help lists it.
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of flag values; flags given on the command line override it.")
    return parser


def _expand_config(argv: list[str]) -> list[str]:
    """``--config FILE`` (or ``--config=FILE``) replaced by the file's flags, put first so that the command line wins."""
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            return _file_to_argv(argv[i + 1]) + argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return _file_to_argv(arg.split("=", 1)[1]) + argv[:i] + argv[i + 1 :]
    return argv


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Parse flags (and an optional ``--config FILE``), validated, paths included.

    Every error, a mistyped value or an unknown flag included, is a :class:`ConfigError`
    naming the flag; ``--help`` prints every flag and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if is_embedded_default(argv):
        if not os.path.isfile(EMBEDDED_DEFAULT):
            raise ConfigError(
                "the embedded default (no --config, model or data flags) reads recipes/tiny/default.yaml of a source "
                "checkout, which this installation lacks; pass --config FILE or the model and data flags"
            )
        argv = ["--config", EMBEDDED_DEFAULT, *argv]
    argv = _expand_config(argv)
    model_args, data_args, train_args = training_parser().parse_or_raise(argv)
    validate_paths(model_args)
    check_batch_size_flags(argv, data_args)
    check_streaming_flags(model_args, data_args, train_args)
    check_fp8_flags(model_args, train_args)
    if train_args.packed_attention != "auto" and not data_args.max_tokens_per_batch:
        raise ConfigError(f"--packed_attention {train_args.packed_attention} chooses the attention of --max_tokens_per_batch rows; add that flag or drop this one")
    check_quantize_flags(model_args, train_args)
    check_dpo_flags(model_args, data_args, train_args)
    check_sequence_parallel_flags(model_args, data_args, train_args)
    return model_args, data_args, train_args


def is_embedded_default(argv: list[str]) -> bool:
    """No --config and no flag naming a model or data: the run trains the embedded default (its recipe applies)."""
    return not any(a == flag or a.startswith(flag + "=") for a in argv for flag in OWN_RUN_FLAGS)


def embedded_default() -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """The embedded default's settings: what ``python -m mmtrain.train`` with no flags trains."""
    return parse_args([])


def check_batch_size_flags(argv: list[str], data_args: DataArguments) -> None:
    """A micro-batch is sized by samples or by tokens, not both: refuse the two flags together."""
    flag = "--per_device_train_batch_size"
    if data_args.max_tokens_per_batch is not None and any(a == flag or a.startswith(flag + "=") for a in argv):
        raise ConfigError(
            f"--max_tokens_per_batch {data_args.max_tokens_per_batch} sizes each micro-batch by tokens and would win over "
            f"{flag}, which sizes it by samples; drop {flag}"
        )


def check_streaming_flags(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """A stream's length is unknown until it ends: the schedule needs --max_steps; the feature cache must live on disk."""
    if not data_args.streaming:
        return
    if train_args.max_steps < 1:
        raise ConfigError("--streaming needs --max_steps: a stream's length is unknown until it ends, and the schedule needs one")
    if model_args.cache_vision_features and model_args.vision_cache_dir is None:
        # The cache keeps every distinct image's features: in memory it would grow with the stream.
        raise ConfigError(
            "--cache_vision_features with --streaming needs --vision_cache_dir: an in-memory cache grows with every new "
            "image of the stream, while host memory should stay flat"
        )


def check_fp8_flags(model_args: ModelArguments, train_args: TrainArguments) -> None:
    """``--fp8_base`` converts frozen weights: with every LM weight training there is nothing to convert.

    The device and ZeRO-stage checks come once the Accelerator exists
    (``mmtrain.training.speedups.check_fp8``), still before any weights load.
    """
    if train_args.fp8_base and model_args.lm_mode == "full":
        raise ConfigError(
            "--fp8_base holds the LM's frozen Linear weights in float8, and --lm_training full trains all of them: "
            "nothing would be converted; drop one of them"
        )


def check_quantize_flags(model_args: ModelArguments, train_args: TrainArguments) -> None:
    """``--quantize_base`` / ``--quantize_vision``: what can be told from the flags and the installation.

    The device and ZeRO-stage checks come once the Accelerator exists
    (``mmtrain.training.speedups.check_quantize``), still before any weights load.
    """
    flags = [f"--{name} nf4" for name in ("quantize_base", "quantize_vision") if getattr(train_args, name) == "nf4"]
    if not flags:
        return
    given = " and ".join(flags)
    if train_args.quantize_base == "nf4" and model_args.lm_mode == "full":
        raise ConfigError(
            "--quantize_base nf4 holds the LM's frozen Linear weights in 4 bits, and --lm_training full trains all of them: "
            "nothing would be quantised; use --lm_training lora (QLoRA) or drop --quantize_base"
        )
    if train_args.quantize_base == "nf4" and train_args.fp8_base:
        raise ConfigError("--quantize_base nf4 and --fp8_base each hold the LM's frozen weights in another format; pick one")
    if train_args.quantize_vision == "nf4" and train_args.fp8_vision:
        raise ConfigError("--quantize_vision nf4 and --fp8_vision each hold the vision tower's frozen weights in another format; pick one")
    from mmtrain.model.nf4 import bitsandbytes_installed

    if not bitsandbytes_installed():
        raise ConfigError(f"{given} needs bitsandbytes, which is not installed: pip install 'mmtrain[qlora]' (or bitsandbytes>=0.48), or drop the flag")


def check_dpo_flags(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """What ``--objective dpo`` does not do (yet), refused naming the flag before any weights load.

    The reference policy is the trained weights' starting values swapped in, or LoRA
    switched off (:mod:`mmtrain.training.reference`; at ZeRO-3 each process swaps its
    share); with the LM's own weights trained, the starting copy is a frozen copy of them
    (``mmtrain.memory --objective dpo`` counts it). What the DeepSpeed config decides is
    checked once the Accelerator exists (``check_reference_supported``).
    """
    if train_args.objective != "dpo":
        for name in ("dpo_beta", "dpo_loss", "dpo_sft_weight", "dpo_share_prompt", "precompute_ref"):
            if getattr(train_args, name) != TrainArguments.__dataclass_fields__[name].default:
                raise ConfigError(f"--{name} applies to --objective dpo only; add --objective dpo or drop --{name}")
        return
    refused = {
        "--packing": (data_args.packing, "pairs are packed whole, each into its micro-batch's row, by --max_tokens_per_batch"),
        "--dataset_concatenate_samples": (
            data_args.dataset_concatenate_samples > 1,
            "joined pairs would put one pair's chosen answer into the next pair's prompt, which both of its answers then see",
        ),
    }
    for flag, (given, why) in refused.items():
        if given:
            raise ConfigError(f"{flag} does not apply to --objective dpo: {why}; drop it")
    if train_args.precompute_ref and data_args.streaming:
        raise ConfigError(
            "--precompute_ref keeps each training pair's reference values by its index in a dataset read up front; "
            "a --streaming set has none: drop one of them"
        )


def check_sequence_parallel_flags(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """What ``--sequence_parallel_size N`` (N > 1) cannot split, refused before any weights load.

    The process count, the DeepSpeed config and the LM's heads are checked once the
    Accelerator exists (:func:`mmtrain.training.sequence_parallel.check_sequence_parallel`).
    """
    size = train_args.sequence_parallel_size
    if size == 1:
        return
    flag = f"--sequence_parallel_size {size}"
    if model_args.enable_mmca_attention:
        raise ConfigError(
            f"{flag} cannot split MMCA (--enable_mmca_attention): MMCA computes attention under a mask of the whole row "
            "(causal, packed samples, image columns), and DeepSpeed's Ulysses attention passes no mask to the attention it wraps"
        )
    if train_args.packed_attention in ("flex_attention", "sdpa"):
        raise ConfigError(
            f"{flag} cannot split --packed_attention {train_args.packed_attention}: DeepSpeed's Ulysses attention drops the "
            "mask (and rebuilds flex attention's as plain causal), so packed samples would attend to each other; "
            "leave --packed_attention auto (a variable-length kernel keeps the samples apart)"
        )
    if not data_args.max_tokens_per_batch and train_args.per_device_train_batch_size != 1:
        raise ConfigError(
            f"{flag} splits one row per micro-batch: pass --per_device_train_batch_size 1 (or --max_tokens_per_batch, "
            f"one packed row), not {train_args.per_device_train_batch_size}"
        )
    refused = {
        "--objective dpo": (train_args.objective == "dpo", "a pair's log-probability needs its whole rows on one process"),
        "--streaming": (data_args.streaming, "each process reads its own shards, and a group needs the same rows"),
        "--torch_compile true": (train_args.torch_compile == "true", "the attention's all-to-all runs inside each decoder layer"),
    }
    for other, (given, why) in refused.items():
        if given:
            raise ConfigError(f"{flag} is not supported with {other} ({why}); drop one of them")


def validate_paths(model_args: ModelArguments) -> None:
    """Each model flag must name a preset or a folder holding a Hugging Face config."""
    flags = (("lm_model_name_or_path", "language"), ("vision_model_name_or_path", "vision"), ("vision_model_name_or_path_2", "vision"))
    for flag, kind in flags:
        value = getattr(model_args, flag)
        if value is None:  # the optional second vision encoder
            continue
        if presets.is_preset(value):
            if presets.PRESETS[value].kind != kind:
                raise ConfigError(f"--{flag} {value!r} is a {presets.PRESETS[value].kind} preset; {kind} presets: {', '.join(presets.preset_names(kind))}")
            continue
        if not os.path.isdir(value):
            raise ConfigError(
                f"--{flag} {value!r} is neither a local folder nor a preset; presets: {', '.join(presets.preset_names(kind))}"
            )
        if not os.path.isfile(os.path.join(value, "config.json")):
            raise ConfigError(f"--{flag} {value!r} is a folder without config.json, so not a Hugging Face model folder")
