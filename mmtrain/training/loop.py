"""The training loop: steps, logging, eval, checkpoints and epoch exports."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mmtrain.compat import accelerate as accelerate_compat
from mmtrain.model.pretrained import save_pretrained
from mmtrain.data.packing import samples_in
from mmtrain.data.preference import pairs_in
from mmtrain.training import distributed, speedups, weighting
from mmtrain.training.checkpoint import TrainerState, quiet_save
from mmtrain.training.engine_view import Prepared, unwrap_vlm
from mmtrain.training.evaluate import evaluate_generation, evaluate_loss, evaluate_preference
from mmtrain.training.preference import METRICS
from mmtrain.training.sample_record import INDICES_KEY, SampleRecord
from mmtrain.training.stream_loader import StreamLoader

if TYPE_CHECKING:
    from mmtrain.args import DataArguments, ModelArguments, TrainArguments
    from mmtrain.model.builder import BuiltModel

logger = logging.getLogger("mmtrain")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is intact."""


@dataclass(frozen=True)
class LoopInputs:
    """What the loop reads: the prepared loaders (``eval_loader`` None: no evaluation), the datasets
    they come from (:func:`mmtrain.data.build.build_datasets`'s result; generation examples, reports)
    and the built model (tokenizer, config)."""

    train_loader: Any
    eval_loader: Any
    data: Any
    built: BuiltModel


@dataclass(frozen=True)
class RunFlags:
    """The run's parsed flags, by group."""

    model: ModelArguments
    data: DataArguments
    train: TrainArguments


class Loop:
    def __init__(self, prepared: Prepared, inputs: LoopInputs, flags: RunFlags, *, checkpointer, metrics, state: TrainerState, total_steps: int, objective=None):
        """``checkpointer`` and ``metrics`` (a :class:`~mmtrain.training.metrics.MetricsLogger`) may be None for a
        caller that only runs :meth:`train_step`; ``total_steps`` is the schedule's length."""
        accelerator, model, data, train_args, model_args = prepared.accelerator, prepared.model, inputs.data, flags.train, flags.model
        self.acc = accelerator
        self.model = model
        self.optimizer = prepared.optimizer
        self.scheduler = prepared.scheduler
        self.train_loader = inputs.train_loader
        self.eval_loader = inputs.eval_loader
        self.data = data
        self.built = inputs.built
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.state = state
        self.model_args = model_args
        self.data_args = flags.data
        self.args = train_args
        self.total_steps = total_steps
        # --objective dpo: a mmtrain.training.preference.PreferenceObjective; each step's loss is a mean over its pairs.
        self.objective = objective
        self.zero3 = distributed.zero_stage(accelerator) == 3
        self.max_grad_norm = distributed.max_grad_norm(accelerator, train_args)
        self.deepspeed = distributed.deepspeed_plugin(accelerator) is not None
        self.generation_examples = data.generation_examples(train_args.eval_generate) if train_args.eval_generate else []
        self.last_eval: dict = {}
        self.vision_cache = speedups.make_vision_cache(accelerator, model, model_args, train_args.output_dir)
        # The loss of every optimizer step is one mean over its answer tokens, on every
        # process and micro-batch, however batches are sized (mmtrain/training/weighting.py).
        self.step_tokens: torch.Tensor | None = None  # the current step's answer tokens, all processes
        # fp16 runs under a loss scaler (DeepSpeed's, or Accelerate's GradScaler), which skips
        # the update of a step whose gradients overflowed: see _settle.
        self.loss_scaled = distributed.compute_dtype(accelerator) == torch.float16
        self.skipped_steps: set[int] = set()  # steps whose update the fp16 loss scaler skipped
        self.pending: list[tuple] = []  # (step, loss, its weight, tokens, samples, preference metric sums) not yet read back
        self.window = _Window()  # read-back values since the last log line
        self.unreduced_tokens = 0  # this process's tokens read back but not yet summed over processes into tokens_seen
        self.logged_step = state.global_step  # the last step a train log line covers
        self.dropped_before = self._dropped_so_far()  # bad samples dropped before this epoch
        self.sample_record = SampleRecord(accelerator, train_args.output_dir, train_args.record_samples)

    # -- the loop -------------------------------------------------------------------
    def fit(self) -> dict:
        self._rewind_metrics()
        self.sample_record.rewind(self.state.global_step)
        # Log lines are written above the progress bar instead of onto the end of its line.
        with logging_redirect_tqdm(tqdm_class=tqdm):
            return self._fit()

    def _rewind_metrics(self) -> None:
        """metrics.jsonl as it was when the resumed checkpoint was written (empty for a fresh start)."""
        state = self.state
        resumed = state.global_step > 0
        dropped = self.metrics.rewind(state.metrics_records if resumed else 0, state.global_step)
        if dropped and resumed:
            logger.info(f"metrics.jsonl: dropped {dropped} records written after the checkpoint of step {state.global_step}; they are logged again")
        elif dropped:
            logger.info(f"metrics.jsonl: dropped {dropped} records of an earlier start that left no checkpoint")

    def _fit(self) -> dict:
        args, state = self.args, self.state
        # Training mode from the first step, as after every evaluation: from_pretrained hands
        # the LM over in eval mode, and what depends on the mode (DeepSpeed's Ulysses attention,
        # which steps aside in eval mode; checkpointing; dropout) must not wait for an eval.
        self.model.train()
        progress = tqdm(total=self.total_steps, initial=state.global_step, disable=not self.acc.is_local_main_process, desc="train")
        while state.epoch < args.num_train_epochs and not self._done():
            self._set_epoch(state.epoch)
            loader = self.train_loader
            if state.step_in_epoch and not isinstance(loader, StreamLoader):  # a stream continues from its saved position
                loader = self.acc.skip_first_batches(loader, state.step_in_epoch)
            for batch in self.micro_batches(loader):
                self.sample_record.write(state.epoch, state.global_step + 1, batch)
                self.pending.append((state.global_step + 1, *self.train_step(batch)))
                state.step_in_epoch += 1
                if not self.acc.sync_gradients:
                    continue
                state.global_step += 1
                progress.update(1)
                if state.global_step % args.logging_steps == 0 or self._done():
                    self._log_train()  # at --max_steps too: the run's last window, however short
                if args.eval_steps and state.global_step % args.eval_steps == 0:
                    self._evaluate()
                if args.save_steps and state.global_step % args.save_steps == 0 and not self._done():
                    self._save()  # the last step's checkpoint is written at the end, after its eval
                if self._done():
                    break
            epoch_finished = not self._done() or self._at_epoch_end()
            if epoch_finished and state.epoch + 1 >= args.num_train_epochs and state.global_step > self.logged_step:
                self._log_train()  # the last epoch's last steps, short of --logging_steps
            if epoch_finished:
                self._end_epoch()
            else:
                break
        progress.close()
        if not self.last_eval or self.last_eval.get("step") != state.global_step:
            self._evaluate()
        if state.step_in_epoch:  # stopped by --max_steps inside an epoch
            # After the eval, as at an epoch end: the checkpoint counts its record, so a run
            # resumed from it (with a larger --max_steps, say) keeps that record.
            self._save()
        return {"global_step": state.global_step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in self.last_eval.items()}}

    def _at_epoch_end(self) -> bool:
        if isinstance(self.train_loader, StreamLoader):
            return self.train_loader.exhausted
        return self.state.step_in_epoch >= len(self.train_loader)

    def _done(self) -> bool:
        return self.args.max_steps > 0 and self.state.global_step >= self.args.max_steps

    def _set_epoch(self, epoch: int) -> None:
        # Sampler order and sample concatenation both change each epoch, from the seed.
        self.train_loader.set_epoch(epoch)
        self.data.train.set_epoch(epoch)

    def micro_batches(self, loader):
        """The loader's micro-batches, one optimizer step's at a time, with the step's answer tokens counted first.

        Every loader goes through here, a stream's included: the loop, not Accelerate's
        ``accumulate``, decides where a step ends, and an epoch's end closes the step in
        progress (its last one may hold fewer micro-batches, with a loss of its own tokens),
        so no gradient crosses an epoch's end and an epoch-end checkpoint holds none. A
        stream agrees on its windows across processes itself (:meth:`StreamLoader.windows`).
        """
        accumulation = self.acc.gradient_accumulation_steps
        if isinstance(loader, StreamLoader):
            windows = ((group, torch.tensor(tokens, device=self.acc.device)) for group, tokens in loader.windows(accumulation, weighting.label_tokens))
        else:
            count = pairs_in if self.objective else weighting.label_tokens
            windows = ((group, weighting.step_label_tokens(self.acc, group, count)) for group in weighting.step_groups(loader, accumulation))
        for group, tokens in windows:
            self.step_tokens = tokens
            for i, batch in enumerate(group):
                accelerate_compat.set_sync_gradients(self.acc, i == len(group) - 1)
                yield batch

    def _accumulate(self):
        """Gradients synchronised across processes only at the step boundary :meth:`micro_batches` set."""
        return contextlib.nullcontext() if self.acc.sync_gradients else self.acc.no_sync(self.model)

    def train_step(self, batch) -> tuple:
        """One forward/backward (and optimizer step at the accumulation boundary).

        Returns the batch's mean loss, its weight (answer tokens; pairs under DPO), its
        tokens, its samples (pairs under DPO) and its preference metrics' sums (None for
        SFT) as they are, device tensors included: reading them here would make the host
        wait for the GPU every step. :meth:`_settle` reads a whole window of them at once.
        The loss that is backpropagated is the batch's share of the step's mean
        (:meth:`micro_batches` has counted the step's answer tokens, or pairs, first).
        """
        pairs = batch.pop(INDICES_KEY, None)  # the dataset's indices of the batch's samples, where the loader adds them
        batch = speedups.encode_with_cache(self.vision_cache, batch)
        with self._accumulate():
            if self.objective is None:
                out = self.model(**batch)
                loss, weight, samples, extras = out.loss, out.num_label_tokens, samples_in(batch), None
            else:
                result = self.objective(self.model, batch, pairs)
                loss, samples, extras = result.loss.mean(), pairs_in(batch), result.metric_sums()
                weight = torch.tensor(float(samples), device=loss.device)
            self.acc.backward(weighting.weighted_loss(loss, weight, self.step_tokens, self.acc))
            if self.acc.sync_gradients and not self.deepspeed:
                self._grad_norm = self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.max_grad_norm)
            self.optimizer.step()
            # A step skipped on an fp16 overflow (GradScaler, or DeepSpeed's loss scaler) does
            # not advance the schedule: it follows the updates actually applied. The flag is
            # the same on every process (the overflow check reduces over all of them).
            if self.acc.sync_gradients:
                if not self.optimizer.step_was_skipped:
                    self.scheduler.step()
                elif self.loss_scaled:
                    self.skipped_steps.add(self.state.global_step + 1)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), weight.detach(), batch["attention_mask"].sum(), samples, extras

    def _settle(self) -> None:
        """Read back the steps run since the last call: stop on a non-finite loss, count tokens.

        Called before every log line, eval and checkpoint, on every process at the same
        step, so a bad step is reported with its number and never reaches a checkpoint;
        the checkpoints already written are those of finite steps. The processes decide
        together (:meth:`_stop_on_non_finite`): a process that stopped alone would leave the
        others waiting in their next collective until the backend's timeout.

        Overflow: under fp16, a non-finite loss in a step whose update the loss scaler
        skipped (DeepSpeed's, or Accelerate's GradScaler) is the scaler's business, not an
        error: the weights did not change, and the scaler lowers its scale and goes on
        (DeepSpeed stops by itself, on every process, once the scale reaches its minimum).
        bf16 has fp32's range and no scaler, so under bf16 and fp32 every non-finite loss
        stops the run, even where DeepSpeed's optimizer skipped the update on seeing
        non-finite gradients: the weights are then intact, but the cause (a sample, a
        diverging run) would recur unseen.
        """
        pending, self.pending = self.pending, []
        first_bad = None  # (step, value) of this process's first non-finite loss in an applied step
        for step, loss, label_tokens, tokens, samples, extras in pending:
            loss = float(loss)
            tokens, samples = int(tokens), int(samples)
            finite = math.isfinite(loss)
            if not finite and step not in self.skipped_steps and first_bad is None:
                first_bad = (step, loss)
            if not finite and step in self.skipped_steps:
                logger.warning(f"loss is {loss} at step {step} on process {self.acc.process_index}: the fp16 loss scaler skipped that step's update")
            self.unreduced_tokens += tokens  # summed over processes when logged or saved (no extra sync per step)
            # the logged loss is the window's mean over answer tokens, as the objective is
            self.window.add(step, loss if finite else 0.0, float(label_tokens) if finite else 0.0, tokens, samples)
            if extras is not None and finite:
                self.window.add_metrics(extras.double().cpu())
        self.skipped_steps = {s for s in self.skipped_steps if s > self.state.global_step}
        self._stop_on_non_finite(first_bad)

    def _stop_on_non_finite(self, first_bad: tuple[int, float] | None) -> None:
        """Every process learns of any process's non-finite loss, and all raise the same error here.

        One small gather per call (a log line, an eval or a checkpoint, never per
        micro-batch), at a point every process reaches at the same step.
        """
        mine = [float(first_bad[0]), first_bad[1]] if first_bad else [math.inf, 0.0]
        if self.acc.num_processes == 1:
            everyone = [mine]
        else:
            everyone = self.acc.gather(torch.tensor([mine], dtype=torch.float64, device=self.acc.device)).tolist()
        step = min(s for s, _ in everyone)
        if step == math.inf:
            return
        ranks = [rank for rank, (s, _) in enumerate(everyone) if s == step]
        where = f"process {ranks[0]}" if len(ranks) == 1 else f"processes {', '.join(map(str, ranks))}"
        raise TrainingError(
            f"loss is {everyone[ranks[0]][1]} at step {int(step)} on {where} of {self.acc.num_processes} (epoch {self.state.epoch}); "
            f"every process stops here. The last good checkpoint under {self.args.output_dir}/checkpoints is intact."
        )

    def _save(self) -> None:
        self._settle()
        self._count_tokens()
        self.state.metrics_records = self.metrics.records
        with self.window.paused(), quiet_save(self.args.verbose):
            path = self.checkpointer.save(self.state)
        if self.acc.is_main_process:
            logger.info(f"checkpoint {path}")

    def _grad_norm_value(self) -> float | None:
        if self.deepspeed:
            norm = self.model.get_global_grad_norm()
        else:
            norm = getattr(self, "_grad_norm", None)
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def _count_tokens(self, reduced: float | None = None) -> None:
        """Add every process's tokens read back since the last call to ``tokens_seen`` (``reduced``: that sum, already taken)."""
        if reduced is None:
            reduced = self.acc.reduce(torch.tensor(float(self.unreduced_tokens), dtype=torch.float64, device=self.acc.device), "sum").item()
        self.state.tokens_seen += int(round(reduced))
        self.unreduced_tokens = 0

    def _log_train(self) -> None:
        self._settle()
        preference = self.window.drain_metrics(len(METRICS))
        loss_sum, weight, tokens, samples, steps, seconds = self.window.drain()
        # Every process saw its own tokens: report the global rates and per-step sizes.
        totals = self.acc.reduce(
            torch.tensor([tokens, samples, loss_sum, weight, self.unreduced_tokens], dtype=torch.float64, device=self.acc.device), "sum"
        )
        self._count_tokens(totals[4].item())
        self.logged_step = self.state.global_step
        values = {
            "loss": totals[2].item() / max(totals[3].item(), 1e-12),
            **self._preference_means(preference, totals[3].item()),
            "tokens_per_s": totals[0].item() / seconds,
            "samples_per_s": totals[1].item() / seconds,
            "tokens_per_step": totals[0].item() / max(steps, 1),
            "samples_per_step": totals[1].item() / max(steps, 1),
            "tokens_seen": self.state.tokens_seen,  # all processes, since the run began
        }
        norm = self._grad_norm_value()
        if norm is not None:
            values["grad_norm"] = norm
        for group in self.optimizer.param_groups:
            values[f"lr_{group.get('name', 'group')}"] = group["lr"]
        self.metrics.log("train", self.state.global_step, self._epoch_progress(), values)

    def _preference_means(self, sums: torch.Tensor, pairs: float) -> dict[str, float]:
        """Under DPO: the window's rewards, margin and accuracy, means over every process's pairs (the loss's weight)."""
        if self.objective is None:
            return {}
        sums = self.acc.reduce(sums.to(self.acc.device), "sum")
        return {name: value / max(pairs, 1e-12) for name, value in zip(METRICS, sums.tolist())}

    def _epoch_progress(self) -> float:
        if isinstance(self.train_loader, StreamLoader) and not self.train_loader.batches_last_epoch:
            return float(self.state.epoch)  # a stream's first epoch has no known length
        return self.state.epoch + self.state.step_in_epoch / max(len(self.train_loader), 1)

    def _evaluate(self) -> dict:
        self._settle()
        with self.window.paused():  # eval time is not training time: tokens_per_s leaves it out
            return self._evaluate_now()

    def _evaluate_now(self) -> dict:
        if self.objective is None:
            result = evaluate_loss(self.acc, self.model, self.eval_loader)
        else:
            result = evaluate_preference(self.acc, self.model, self.eval_loader, self.objective)
        if self.generation_examples:
            gen = evaluate_generation(
                self.acc, unwrap_vlm(self.acc, self.model), self.built.tokenizer, self.generation_examples,
                batch_size=self.args.per_device_eval_batch_size, max_new_tokens=self.args.max_new_tokens, zero3=self.zero3,
            )
            samples = gen.pop("samples")
            result.update(gen)
            if self.acc.is_main_process and samples:
                logger.info("eval answers: " + "; ".join(f"expected {s['expected']!r} got {s['generated']!r}" for s in samples))
        self.metrics.log("eval", self.state.global_step, self._epoch_progress(), result)
        if "loss" in result and (self.state.best_eval_loss is None or result["loss"] < self.state.best_eval_loss):
            self.state.best_eval_loss = result["loss"]
        self.last_eval = {**result, "step": self.state.global_step}
        return result

    def _end_epoch(self) -> None:
        epoch = self.state.epoch
        self._log_dropped(epoch)
        self._evaluate()
        if self.args.export_each_epoch:
            with self.window.paused():
                self.export(os.path.join(self.args.output_dir, f"epoch-{epoch}"))
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self._save()

    def _dropped_so_far(self) -> int:
        # a loop driven by a harness may have no data bundle (benchmarks/mmtrain_run.py)
        return getattr(getattr(self.data, "train", None), "skipped_bad_samples", 0)

    def _log_dropped(self, epoch: int) -> None:
        """Under --on_bad_sample skip: how many training samples this epoch lost to unreadable images, all processes."""
        if self.data_args.on_bad_sample != "skip":
            return
        total = self._dropped_so_far()
        new, self.dropped_before = total - self.dropped_before, total
        dropped = int(self.acc.reduce(torch.tensor(float(new), dtype=torch.float64, device=self.acc.device), "sum").item())
        if dropped and self.acc.is_main_process:
            logger.warning(f"epoch {epoch}: {dropped} training samples dropped, their images unreadable (--on_bad_sample skip)")

    def export(self, folder: str) -> None:
        """Fuse LoRA into a copy, save an HF-format folder (main process), training weights untouched."""
        with quiet_save(self.args.verbose):
            state = self.acc.get_state_dict(self.model)  # gathers ZeRO-3 partitions on the main process
            if self.acc.is_main_process:
                view = self.acc.unwrap_model(self.model)
                save_pretrained(
                    folder, view.full_state_dict(state), view.vlm, self.built.tokenizer, self.built.image_processor, self.built.config,
                    template=self.data_args.template, system_prompt=self.data_args.system_prompt,
                )
        if self.acc.is_main_process:
            logger.info(f"exported {folder}")
        self.acc.wait_for_everyone()


class _Window:
    """Running sums between two log lines; its seconds leave out what ran :meth:`paused` (eval, exports, checkpoints)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0  # seconds spent paused
        self.loss_sum = 0.0  # losses times their weights
        self.weight = 0.0
        self.tokens = 0
        self.samples = 0
        self.steps: set[int] = set()
        self.metrics: torch.Tensor | None = None  # preference metric sums (DPO), summed on the host

    def add_metrics(self, sums: torch.Tensor) -> None:
        self.metrics = sums if self.metrics is None else self.metrics + sums

    def drain_metrics(self, size: int) -> torch.Tensor:
        """The preference metric sums since the last call (zeros when none), reset; call before :meth:`drain`."""
        sums, self.metrics = self.metrics, None
        return torch.zeros(size, dtype=torch.float64) if sums is None else sums

    def add(self, step: int, loss: float, weight: float, tokens: int, samples: int) -> None:
        self.loss_sum += loss * weight
        self.weight += weight
        self.tokens += tokens
        self.samples += samples
        self.steps.add(step)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count as the window's training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def drain(self) -> tuple[float, float, int, int, int, float]:
        """(weighted loss sum, weight, tokens, samples, optimizer steps, training seconds) since the last drain."""
        now = time.perf_counter()
        seconds = max(now - self.start - self.excluded, 1e-9)
        out = (self.loss_sum, self.weight, self.tokens, self.samples, len(self.steps), seconds)
        self.__init__()
        return out


def print_final_report(result: dict) -> None:
    lines = [f"training finished at step {result['global_step']}"]
    if "eval_perplexity" in result:
        lines.append(f"  eval loss {result['eval_loss']:.4f} (perplexity {result['eval_perplexity']:.3f}) over {result['eval_label_tokens']} answer tokens")
    elif "eval_label_tokens" in result:
        lines.append("  no eval loss: no eval set (--eval_ratio 0 and no --eval_dataset_names), or no answer tokens in it")
    if "eval_accuracy" in result:
        lines.append(
            f"  eval preference accuracy {100 * result['eval_accuracy']:.1f}% on {result['eval_pairs']} held-out pairs "
            f"(reward margin {result['eval_margin']:.4f}; 50% is the reference's tie)"
        )
    if "eval_exact_match" in result:
        lines.append(
            f"  eval exact match {100 * result['eval_exact_match']:.1f}% on {result['eval_questions']} held-out questions "
            f"(majority-answer baseline {100 * result['eval_majority_baseline']:.1f}%: the most frequent answer to each question)"
        )
    print("\n".join(lines), flush=True)
