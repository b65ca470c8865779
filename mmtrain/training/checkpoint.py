"""Checkpoints that resume exactly and can never be mistaken for whole when they are not.

A checkpoint is ``output_dir/checkpoints/step-XXXXXXXX/``: Accelerate's ``save_state``
(the DeepSpeed engine's model and optimizer shards or the plain optimizer, the
scheduler, and every process's python / numpy / torch / cuda RNG state) plus
``trainer_state.json`` (epoch, position inside the epoch, step, best eval loss) and
``manifest.json`` (with the model's whole config). It is written under a ``.tmp`` name and renamed into place only when
every rank has finished writing and the manifest is in it, so a kill at any moment
leaves either the previous checkpoints or a ``.tmp`` folder that is ignored and removed.

Only trainable parameters are stored: the frozen ones come from the source folders the
manifest names. Resuming checks that the model flags match the manifest's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass

import torch

from mmtrain.model.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1


@dataclass
class TrainerState:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # micro-batches of this epoch already consumed
    global_step: int = 0  # optimizer steps done
    best_eval_loss: float | None = None
    tokens_seen: int = 0
    # Records in metrics.jsonl when the checkpoint was written: a resumed run cuts the file
    # back to them before it logs the steps after the checkpoint again. None: written
    # before this field existed.
    metrics_records: int | None = None


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_RE.match(n) and os.path.isfile(os.path.join(root, n, MANIFEST)))
    return [os.path.join(root, n) for n in names]


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """``latest`` -> the newest complete checkpoint (None if there is none); a path is checked."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume):
        raise ConfigError(f"--resume_from_checkpoint {resume!r}: no such folder")
    if not os.path.isfile(os.path.join(resume, MANIFEST)):
        raise ConfigError(
            f"--resume_from_checkpoint {resume!r} has no {MANIFEST}: it is not a checkpoint, or it was cut off while "
            f"being written; pick a complete one under {checkpoint_root(output_dir)}"
        )
    return resume


def check_manifest(path: str, config, trainable_names: list[str]) -> dict:
    """The checkpoint's manifest, if it is of this model (``config``: its VLMConfig) with these trainable tensors."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"checkpoint {path}: {MANIFEST} is not valid JSON ({e}); it was cut off or damaged, resume from another") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path}: format {manifest.get('format_version')} is not {FORMAT_VERSION}")
    diffs = config.differences(manifest["model"])
    if diffs:
        raise ConfigError(f"checkpoint {path} is from a different model: " + "; ".join(diffs))
    if sorted(manifest["trainable_parameters"]) != sorted(trainable_names):
        raise ConfigError(f"checkpoint {path}: its trainable parameters differ from this model's")
    return manifest


def _trainable_only(state_dict: dict, trainable: set[str]) -> dict:
    return {k: v for k, v in state_dict.items() if k in trainable}


class Checkpointer:
    """Saves and restores training state through Accelerate, trainable parameters only."""

    def __init__(self, accelerator, output_dir: str, config, trainable_names: list[str], keep: int):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.config = config  # the model's VLMConfig, saved with every checkpoint
        self.trainable_names = trainable_names
        self.keep = keep
        self.is_deepspeed = accelerator.state.deepspeed_plugin is not None
        if not self.is_deepspeed:
            trainable = set(trainable_names)

            def keep_trainable(models, weights, _dir):
                # Without DeepSpeed, Accelerate would write the whole (mostly frozen) model.
                for i, w in enumerate(weights):
                    weights[i] = _trainable_only(w, trainable)

            accelerator.register_save_state_pre_hook(keep_trainable)

    def save(self, state: TrainerState) -> str:
        acc = self.accelerator
        root = checkpoint_root(self.output_dir)
        final = os.path.join(root, f"step-{state.global_step:08d}")
        tmp = final + ".tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        acc.wait_for_everyone()
        if self.is_deepspeed:
            acc.save_state(tmp, exclude_frozen_parameters=True)
        else:
            acc.save_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(asdict(state), f, indent=2)
            manifest = {
                "format_version": FORMAT_VERSION,
                "model": self.config.identity(),
                "model_config": self.config.to_dict(),
                "trainable_parameters": self.trainable_names,
                "stores": "trainable parameters only; frozen weights come from the source model folders",
                "num_processes": acc.num_processes,
                "zero_stage": int(acc.state.deepspeed_plugin.zero_stage) if self.is_deepspeed else None,
            }
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str) -> TrainerState:
        manifest = check_manifest(path, self.config, self.trainable_names)
        acc = self.accelerator
        if self.is_deepspeed and manifest.get("num_processes") != acc.num_processes:
            raise ConfigError(
                f"checkpoint {path} was written by {manifest.get('num_processes')} processes and this run has "
                f"{acc.num_processes}; DeepSpeed's partitioned optimizer states resume on the same process count "
                "(convert it with DeepSpeed's universal checkpoint tools to change it)"
            )
        try:
            if self.is_deepspeed:
                acc.load_state(path, load_module_strict=False)
            else:
                acc.load_state(path, strict=False)
        except Exception as e:  # torch.load, safetensors and DeepSpeed each raise their own types
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"checkpoint {path} cannot be loaded (corrupt or incomplete?): {e}") from None
        with open(os.path.join(path, TRAINER_STATE)) as f:
            return TrainerState(**json.load(f))


# Libraries whose loggers narrate every file of a save at INFO level: Accelerate's "Saving
# current state" / "Random states saved" / "Sampler state saved", huggingface_hub's "Model
# weights successfully saved", DeepSpeed's and transformers' own.
SAVE_CHATTER = ("accelerate", "DeepSpeed", "huggingface_hub", "transformers")


def _chatty_loggers() -> list[logging.Logger]:
    found = []
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger):
            continue
        for lib in SAVE_CHATTER:
            # huggingface_hub names some loggers by their file's path (".../huggingface_hub/serialization/_torch.py").
            if name == lib or name.startswith(lib + ".") or f"{os.sep}{lib}{os.sep}" in name:
                found.append(lg)
                break
    return found


@contextlib.contextmanager
def quiet_save(verbose: bool = False):
    """The libraries' per-file lines and progress bars held back while a checkpoint or export is written.

    Their warnings and errors still show; ``verbose`` (``--verbose``) leaves everything as it is.
    """
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    loggers = _chatty_loggers()
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards"
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def remove_partial_checkpoints(output_dir: str) -> list[str]:
    """Delete ``.tmp`` folders left by a run killed mid-save; returns what was removed."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    removed = [os.path.join(root, n) for n in os.listdir(root) if n.endswith(".tmp")]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
