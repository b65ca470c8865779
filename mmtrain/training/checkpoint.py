"""Checkpoints that resume exactly and can never be mistaken for whole when they are not.

A checkpoint is ``output_dir/checkpoints/step-XXXXXXXX/``: Accelerate's ``save_state``
(the DeepSpeed engine's model and optimizer shards or the plain optimizer, the
scheduler, and every process's python / numpy / torch / cuda RNG state) plus
``trainer_state.json`` (epoch, position inside the epoch, step, best eval loss),
``trainable_state.safetensors`` (the trainable state whole, see
:mod:`mmtrain.training.portable_state`) and ``manifest.json`` (with the model's whole
config, the process count, the batch layout and what the portable state cost). It is
written under a ``.tmp`` name and renamed into place only when every rank has finished
writing and the manifest is in it, so a kill at any moment leaves either the previous
checkpoints or a ``.tmp`` folder that is ignored and removed. A step saved again (a
finished run launched again with ``latest``) replaces its folder without a moment where
neither copy is whole (:func:`swap_into_place`).

``latest`` is the highest step. A resume from an older checkpoint of the same output
folder moves the later ones into ``checkpoints/abandoned-<time>/`` (logged), so that
``latest`` and rotation follow the resumed run, not the branch it left.

Only trainable parameters are stored: the frozen ones come from the source folders the
manifest names. Resuming checks that the model flags match the manifest's.

Resuming on the process count that wrote the checkpoint restores everything through
Accelerate (bit for bit). On another count the engine is built as usual and then given
the whole trainable state (fp32 masters, weights, Adam moments, step), the scheduler's
state and the trainer state; the per-process RNG files cannot be matched to the new
processes, so every process re-seeds from ``--seed``, the step and its rank (the run is
reproducible, but its random streams, e.g. dropout masks, are not the uninterrupted
run's; the data order does not depend on them).

Where the epoch goes on: Accelerate's prepared loader (``use_seedable_sampler``) orders
the epoch's samples by a permutation drawn from ``--seed`` and the epoch alone, cuts it
into batches of ``--per_device_train_batch_size`` and deals them out in turn: global
batch ``k`` goes to process ``k % P``. After ``s`` batches on each of ``P`` processes
(``step_in_epoch``) the first ``s x P x B`` samples of the permutation are consumed, and
only those. A run with ``P'`` processes, batch ``B'`` and accumulation ``A'`` carries
over that sample count: it skips ``s' = s x P x B / (P' x B')`` batches on each process,
which must be whole and fall on an optimizer-step boundary, i.e. ``P' x B' x A'`` must
divide ``s x P x B``. That always holds when the samples per optimizer step are the same
as the checkpoint's (2 processes x accumulation 1 after 1 process x accumulation 2); a
resume whose position cannot be mapped exactly is refused, naming the flags. The step
count continues from the checkpoint's; the schedule's length is that of the new flags.
Under a token budget (``--max_tokens_per_batch``) the same rule holds with ``B = B' = 1``:
the epoch's micro-batches are planned from the seed, the epoch and the budget alone and
dealt out in the same way, so a resume on another count keeps the same budget flags.
A ``--streaming`` run saves each process's stream position (``stream/rank-N.json``, see
:mod:`mmtrain.data.streaming`) and resumes only on the process count that wrote it.
(As in any run, when the epoch's sample count is not a multiple of ``P' x B'``,
Accelerate fills the last round of batches with samples from the epoch's start.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass

import torch
from accelerate.utils import gather_object

from mmtrain.model.errors import ConfigError
from mmtrain.model.nf4 import codes_in_state_dict
from mmtrain.training import portable_state
from mmtrain.training.engine_view import Prepared
from mmtrain.training.host_memory import RssWatch

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STREAM_DIR = "stream"
FORMAT_VERSION = 1
# A checkpoint being replaced by a new save of its step waits under this suffix until the new one is in place.
ASIDE = ".old"
ABANDONED_PREFIX = "abandoned-"
logger = logging.getLogger("mmtrain")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (every process raises it together); the earlier ones are intact."""


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


def checkpoint_step(path: str) -> int:
    return int(_STEP_RE.match(os.path.basename(path)).group(1))


def set_aside_later_checkpoints(output_dir: str, step: int, resumed_from: str) -> list[str]:
    """Move this output folder's checkpoints past ``step`` into ``checkpoints/abandoned-<time>/``.

    A resume from an older checkpoint starts a new branch of the run: the old branch's
    later checkpoints would otherwise stay ``latest``, and rotation (``--save_total_limit``)
    would delete the new branch's first checkpoints to keep them. They are kept, not
    deleted, and logged. Returns their new paths.
    """
    later = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > step]
    if not later:
        return []
    root = checkpoint_root(output_dir)
    folder = os.path.join(root, ABANDONED_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    base, n = folder, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    os.makedirs(folder)
    moved = []
    for path in later:
        moved.append(os.path.join(folder, os.path.basename(path)))
        os.replace(path, moved[-1])
    logger.warning(
        f"resumed from {resumed_from} (step {step}), older than this run's {', '.join(os.path.basename(p) for p in later)}: "
        f"moved them to {folder} so that 'latest' and --save_total_limit follow the resumed run"
    )
    return moved


def swap_into_place(tmp: str, final: str) -> None:
    """Rename the finished ``tmp`` to ``final``; a ``final`` already there (a step saved again) is kept until then.

    It is renamed aside (``final`` + ``.old``) first, the new one is renamed in, and only
    then is the old one deleted: a kill at any moment leaves one whole checkpoint of the
    step, under ``final`` or, between the two renames, aside, where
    :func:`remove_partial_checkpoints` puts it back.
    """
    aside = final + ASIDE
    if os.path.exists(final):
        shutil.rmtree(aside, ignore_errors=True)  # stale: its step is whole under ``final``
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


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
        raise ConfigError(f"checkpoint {path} is from a different model: " + "; ".join(diffs), fields=tuple(config.identity()))
    if sorted(manifest["trainable_parameters"]) != sorted(trainable_names):
        raise ConfigError(f"checkpoint {path}: its trainable parameters differ from this model's")
    return manifest


@dataclass(frozen=True)
class BatchLayout:
    """How a run cuts an epoch: processes x per-process micro-batch x accumulation steps."""

    num_processes: int
    per_device_train_batch_size: int  # 1 under a token budget: a micro-batch is one planned budget
    gradient_accumulation_steps: int
    # "--max_tokens_per_batch N --max_images_per_batch M" when micro-batches are planned by
    # token budget: the plan is a function of the seed, the epoch and the budget only, so
    # a resume on another process count maps it in micro-batches, with the same budget.
    token_budget: str | None = None
    # --sequence_parallel_size: the processes of a group take the same micro-batches, so an
    # epoch is dealt out to num_processes / sequence_parallel_size groups.
    sequence_parallel_size: int = 1

    @classmethod
    def from_manifest(cls, manifest: dict) -> BatchLayout | None:
        try:
            counts = {k: int(manifest[k]) for k in ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")}
        except (KeyError, TypeError, ValueError):
            return None  # written before the layout was recorded
        return cls(**counts, token_budget=manifest.get("token_budget"), sequence_parallel_size=int(manifest.get("sequence_parallel_size", 1)))

    @property
    def batch_takers(self) -> int:
        """Processes, or sequence-parallel groups, that each take their own micro-batches."""
        return self.num_processes // self.sequence_parallel_size


def map_position(step_in_epoch: int, saved: BatchLayout, now: BatchLayout, path: str, epoch: int) -> int:
    """The batches each process of ``now`` skips to continue the epoch where ``saved`` left it (module docstring)."""
    if saved == now or step_in_epoch == 0:
        return step_in_epoch
    if saved.token_budget != now.token_budget:
        raise ConfigError(
            f"checkpoint {path} was written with micro-batches of {saved.token_budget or '--per_device_train_batch_size samples'} "
            f"and this run plans {now.token_budget or '--per_device_train_batch_size samples'}: the epoch's batches differ, so "
            "where it stopped cannot be found again; resume with the checkpoint's batch flags"
        )
    consumed = step_in_epoch * saved.batch_takers * saved.per_device_train_batch_size
    per_batch_round = now.batch_takers * now.per_device_train_batch_size
    per_step = per_batch_round * now.gradient_accumulation_steps
    if consumed % per_step:
        raise ConfigError(
            f"checkpoint {path} stopped {consumed} samples into epoch {epoch} ({step_in_epoch} batches of "
            f"{saved.per_device_train_batch_size} on each of {saved.num_processes} processes), which is not a whole number of this "
            f"run's optimizer steps of {per_step} samples (--per_device_train_batch_size {now.per_device_train_batch_size} x "
            f"--gradient_accumulation_steps {now.gradient_accumulation_steps} x {now.num_processes} processes); pick values "
            f"whose product divides {consumed}, e.g. the checkpoint's "
            f"{saved.per_device_train_batch_size * saved.gradient_accumulation_steps * saved.num_processes} samples per step"
        )
    return consumed // per_batch_round


def _trainable_only(state_dict: dict, trainable: set[str]) -> dict:
    return {k: v for k, v in state_dict.items() if k in trainable}


# ZeRO stages whose optimizer state Accelerate saves in one layout (DeepSpeed's ZeRO-1 and 2 share an optimizer).
_STATE_LAYOUT = {1: 2}


@dataclass(frozen=True)
class CheckpointSettings:
    """Where checkpoints go, how many are kept, and the run facts a resume maps its position by."""

    output_dir: str
    keep: int  # --save_total_limit: the newest this many stay
    seed: int = 0  # --seed: a resume on another process count re-seeds from it
    # --per_device_train_batch_size: with it the manifest records the batch layout (a resume on
    # another process count needs it); None for checkpoints never resumed on another count.
    per_device_train_batch_size: int | None = None
    token_budget: str | None = None  # the budget flags (DataArguments.token_budget()): micro-batches of one row
    sequence_parallel_size: int = 1  # --sequence_parallel_size: groups of this many processes take the same micro-batches


class Checkpointer:
    """Saves and restores training state through Accelerate, trainable parameters only."""

    def __init__(self, prepared: Prepared, config, trainable_names: list[str], settings: CheckpointSettings, *, stream=None):
        """``prepared``: the Accelerator, and the prepared model, optimizer and schedule; with those each
        checkpoint also carries the portable trainable state and can be resumed on another process count.
        ``stream``: a ``--streaming`` loader, whose position each process saves as ``stream/rank-N.json``."""
        accelerator = prepared.accelerator
        self.accelerator = accelerator
        self.output_dir = settings.output_dir
        self.config = config  # the model's VLMConfig, saved with every checkpoint
        self.trainable_names = trainable_names
        self.keep = settings.keep
        self.model, self.optimizer, self.scheduler = prepared.model, prepared.optimizer, prepared.scheduler
        self.seed = settings.seed
        self.stream = stream
        per_device_train_batch_size, token_budget = settings.per_device_train_batch_size, settings.token_budget
        self.last_write: portable_state.WriteReport | None = None  # this process's share of the last save's portable state
        self.layout = None
        if per_device_train_batch_size is not None:
            micro = 1 if token_budget else per_device_train_batch_size
            self.layout = BatchLayout(
                accelerator.num_processes, micro, accelerator.gradient_accumulation_steps, token_budget, settings.sequence_parallel_size
            )
        self.is_deepspeed = accelerator.state.deepspeed_plugin is not None
        # --precompute_ref: the DPO reference's table (mmtrain.training.reference_table), saved with every checkpoint.
        self.reference_table = None
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
        with RssWatch() as whole_save:
            # Frozen entries are dropped from the engine's state dict once it is built: NF4
            # layers put their codes there, not a dequantised copy (mmtrain/model/nf4.py).
            with codes_in_state_dict():
                if self.is_deepspeed:
                    acc.save_state(tmp, exclude_frozen_parameters=True)
                else:
                    acc.save_state(tmp)
            cost = {}
            if self.model is not None:
                # Every process takes part in each tensor's gather; only the main one keeps a host copy, one tensor at a time.
                with RssWatch() as portable:
                    self.last_write = portable_state.write(
                        os.path.join(tmp, portable_state.PORTABLE_STATE), self.model, self.optimizer, self.is_deepspeed,
                        writer=acc.is_main_process,
                    )
                cost = {
                    "portable_state_rss_growth": portable.growth,
                    "portable_state_host_copy_peak": self.last_write.host_peak_bytes,
                    "error": self.last_write.error,
                }
            if self.stream is not None:
                os.makedirs(os.path.join(tmp, STREAM_DIR), exist_ok=True)
                with open(self._stream_file(tmp), "w") as f:
                    json.dump(self.stream.state_dict(), f)
        cost = {"save_rss_growth": whole_save.growth, "rss_before_save": whole_save.start, **cost}
        per_rank = gather_object([cost]) if acc.num_processes > 1 else [cost]  # also the wait for every rank's files
        errors = [rank.pop("error", None) for rank in per_rank]
        if any(errors):  # every process stops here, together
            raise CheckpointError(
                f"checkpoint {final} could not be written ({'; '.join(e for e in errors if e)}); the earlier checkpoints are "
                f"intact, and {tmp} is removed at the next start"
            )
        if acc.is_main_process:
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(asdict(state), f, indent=2)
            if self.reference_table is not None:  # every process holds it whole
                self.reference_table.save(tmp)
            manifest = {
                "format_version": FORMAT_VERSION,
                "model": self.config.identity(),
                "model_config": self.config.to_dict(),
                "trainable_parameters": self.trainable_names,
                "stores": "trainable parameters only; frozen weights come from the source model folders",
                "num_processes": acc.num_processes,
                "zero_stage": int(acc.state.deepspeed_plugin.zero_stage) if self.is_deepspeed else None,
                **(asdict(self.layout) if self.layout else {}),
            }
            # What the save cost each process in host memory beyond what it held before (bytes,
            # rank order): measured resident-set growth, and the portable state's own copies.
            manifest["host_memory"] = {key: [rank.get(key) for rank in per_rank] for key in per_rank[0]}
            if self.last_write is not None:
                manifest["portable_state"] = {"tensors": self.last_write.tensors, "bytes": self.last_write.bytes_on_disk}
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=2)
            swap_into_place(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: str) -> TrainerState:
        manifest = check_manifest(path, self.config, self.trainable_names)
        acc = self.accelerator
        with open(os.path.join(path, TRAINER_STATE)) as f:
            state = TrainerState(**json.load(f))
        saved = BatchLayout.from_manifest(manifest)
        if self.stream is not None:
            self._load_stream(path, manifest)
        if manifest.get("num_processes") != acc.num_processes:
            self._load_portable(path, manifest, saved, state)
        else:
            self._check_same_zero_stage(path, manifest)
            self._load_same_count(path)
        if saved is not None and self.layout is not None:
            state.step_in_epoch = map_position(state.step_in_epoch, saved, self.layout, path, state.epoch)
        if acc.is_main_process:
            set_aside_later_checkpoints(self.output_dir, state.global_step, path)
        acc.wait_for_everyone()
        return state

    def _stream_file(self, path: str) -> str:
        return os.path.join(path, STREAM_DIR, f"rank-{self.accelerator.process_index}.json")

    def _load_stream(self, path: str, manifest: dict) -> None:
        """This process's stream position; a stream was split among the processes that wrote it, so the count must match."""
        if manifest.get("num_processes") != self.accelerator.num_processes:
            raise ConfigError(
                f"checkpoint {path} was written by {manifest.get('num_processes')} processes and this --streaming run has "
                f"{self.accelerator.num_processes}: each process read its own shards, so resume on "
                f"--num_processes {manifest.get('num_processes')}"
            )
        file = self._stream_file(path)
        if not os.path.isfile(file):
            raise ConfigError(f"checkpoint {path} holds no stream position ({STREAM_DIR}/): it was not written by a --streaming run")
        with open(file) as f:
            self.stream.load_state_dict(json.load(f))

    def _check_same_zero_stage(self, path: str, manifest: dict) -> None:
        """Accelerate's state of one ZeRO stage (or of none) does not load into another: say so, not "corrupt"."""
        now = int(self.accelerator.state.deepspeed_plugin.zero_stage) if self.is_deepspeed else None
        was = manifest.get("zero_stage", now)
        if _STATE_LAYOUT.get(was, was) != _STATE_LAYOUT.get(now, now):
            def name(stage):
                return "no DeepSpeed" if stage is None else f"DeepSpeed ZeRO-{stage}"

            raise ConfigError(
                f"checkpoint {path} was written with {name(was)} and this run uses {name(now)}: the optimizer state is laid "
                f"out per stage. Resume with the Accelerate config it was written with ({name(was)}), or start afresh from "
                "it with --init_from (trained parts only) or from an export (epoch-N)"
            )

    def _load_same_count(self, path: str) -> None:
        """Everything back through Accelerate: weights, optimizer shards, scheduler, each process's RNG."""
        acc = self.accelerator
        try:
            if self.is_deepspeed:
                acc.load_state(path, load_module_strict=False)
            else:
                acc.load_state(path, strict=False)
        except Exception as e:  # torch.load, safetensors and DeepSpeed each raise their own types
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"checkpoint {path} cannot be loaded (corrupt or incomplete?): {e}") from None

    def _load_portable(self, path: str, manifest: dict, saved: BatchLayout | None, state: TrainerState) -> None:
        """A checkpoint of another process count: the whole trainable state into the engine built for this one."""
        from accelerate.utils import SCHEDULER_NAME, set_seed

        acc = self.accelerator
        file = os.path.join(path, portable_state.PORTABLE_STATE)
        written_by = f"checkpoint {path} was written by {manifest.get('num_processes')} processes and this run has {acc.num_processes}"
        if not os.path.isfile(file) or saved is None:
            found = sorted(os.listdir(path))
            raise ConfigError(
                f"{written_by}, and it holds no {portable_state.PORTABLE_STATE} with its batch layout (found: {', '.join(found)}): "
                "it was written before checkpoints could change process count, or by another tool. Resume it with "
                f"--num_processes {manifest.get('num_processes')}, or start a new run from an export (epoch-N)"
            )
        if self.model is None:
            raise ConfigError(f"{written_by}; this Checkpointer was given no model to load it into")
        # Checked before anything is loaded: a position that cannot be mapped stops here.
        map_position(state.step_in_epoch, saved, self.layout or saved, path, state.epoch)
        try:
            tensors, step = portable_state.read(file)
            scheduler_state = torch.load(os.path.join(path, f"{SCHEDULER_NAME}.bin"), weights_only=True)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"checkpoint {path} cannot be loaded (corrupt or incomplete?): {e}") from None
        portable_state.load_into(self.model, self.optimizer, tensors, step, self.is_deepspeed, file)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(scheduler_state)
            # The schedule's state holds the rate of the next step, but the optimizer keeps
            # the fresh schedule's first one until the scheduler steps again.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        # The saved per-process RNG streams belong to processes this run does not have.
        set_seed(self.seed + state.global_step, device_specific=True)
        if acc.is_main_process:
            logger.info(
                f"{written_by}: loaded its whole trainable state ({len(self.trainable_names)} tensors, optimizer step {step}) "
                f"and schedule; RNG re-seeded from --seed, step {state.global_step} and each process's rank"
            )


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
    """Clean up after a run killed mid-save; returns what was removed.

    ``.tmp`` folders (cut off while being written) are deleted. A checkpoint set aside
    (``.old``) by a save of its step again is put back if the new one never arrived, and
    deleted if it did (:func:`swap_into_place`).
    """
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(".tmp"):
            removed.append(path)
            shutil.rmtree(path, ignore_errors=True)
        elif name.endswith(ASIDE) and _STEP_RE.match(name[: -len(ASIDE)]):
            final = path[: -len(ASIDE)]
            if os.path.exists(final):
                removed.append(path)
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
                logger.warning(f"put back {final}: a save of its step again was cut off before the new one was in place")
    return removed


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
