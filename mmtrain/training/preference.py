"""Direct preference optimisation (``--objective dpo``): the loss, and one pass of policy and reference over pair batches.

A pair is a prompt with a chosen and a rejected answer. With ``pi`` the trained policy's
and ``ref`` the reference policy's summed log-probability of an answer, a pair's implicit
rewards are ``beta * (pi - ref)`` of each answer, and

* ``sigmoid`` (DPO): ``-log sigmoid(beta * h)`` with ``h = (pi_c - ref_c) - (pi_r - ref_r)``;
* ``ipo`` (IPO): ``(h - 1 / (2 * beta)) ** 2``, the same ``h`` (log-ratios of whole answers);
* ``length_normalized``: DPO's sigmoid on per-token log-ratios, each answer's log-ratio
  divided by its answer tokens (long answers no longer win by length alone); the rewards
  are per-token too.

``--dpo_sft_weight`` adds that weight times the chosen answer's per-token negative
log-likelihood (RPO's extra term), which keeps the chosen answer likely while the margin
grows.

Each pair weighs the same: the loss of an optimizer step is the mean over its pairs,
across micro-batches and processes (:mod:`mmtrain.training.weighting`, counting pairs
instead of answer tokens). Accuracy counts a pair whose chosen reward beats the rejected
one; a tie counts half, so a policy equal to its reference (the first step) scores 50%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

LOSSES = ("sigmoid", "ipo", "length_normalized")
# The figures logged per step and at eval: means over pairs.
METRICS = ("rewards_chosen", "rewards_rejected", "margin", "accuracy")


@dataclass
class PreferenceLoss:
    """Per-pair values ``[P]`` of one batch; ``loss`` keeps its graph, the rest are detached."""

    loss: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.rewards_chosen - self.rewards_rejected

    @property
    def accuracy(self) -> torch.Tensor:
        """1 where the chosen answer's reward is higher, 0.5 on a tie, 0 where it is lower."""
        return (self.margin > 0).to(self.margin.dtype) + 0.5 * (self.margin == 0).to(self.margin.dtype)

    def metrics(self) -> torch.Tensor:
        """``[P, len(METRICS)]``: each pair's values in :data:`METRICS` order (detached)."""
        return torch.stack([self.rewards_chosen, self.rewards_rejected, self.margin, self.accuracy], dim=1).detach()

    def metric_sums(self) -> torch.Tensor:
        """``[len(METRICS)]`` sums over the batch's pairs, in :data:`METRICS` order (summed across batches, divided by pairs when logged)."""
        return self.metrics().sum(dim=0)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> PreferenceLoss:
    """Per-pair preference losses and rewards from summed answer log-probabilities ``[P]`` (see the module docstring).

    ``chosen_tokens`` and ``rejected_tokens`` (answer tokens per pair) are needed by
    ``length_normalized`` and by ``sft_weight`` > 0.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r}; valid: {', '.join(LOSSES)}")
    needs_lengths = kind == "length_normalized" or sft_weight > 0
    if needs_lengths and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"the {kind} loss{' with an SFT term' if sft_weight > 0 else ''} needs the answers' token counts")
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    if kind == "length_normalized":
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1)
    h = chosen_ratio - rejected_ratio
    if kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        loss = -F.logsigmoid(beta * h)
    if sft_weight > 0:
        loss = loss - sft_weight * policy_chosen.float() / chosen_tokens.clamp(min=1)
    return PreferenceLoss(loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


class PreferenceObjective:
    """One pair batch through the reference and the policy: its per-pair :class:`PreferenceLoss`.

    ``vlm`` is the model behind the prepared ``model`` (for its frozen encoder);
    ``reference`` a :class:`mmtrain.training.reference.ReferencePolicy` of it. Each image
    is encoded once per batch: the features serve the reference's and the policy's
    forward, and within each both answers of its pair (``image_repeats``). With a
    :class:`mmtrain.training.reference_table.ReferenceTable` (``--precompute_ref``) a batch
    that names its pairs (``pairs``: their dataset indices) reads the reference's values
    from it and runs the policy's forward only.
    """

    def __init__(self, vlm, reference, *, beta: float, kind: str, sft_weight: float, table=None):
        self.vlm = vlm
        self.reference = reference
        self.beta = beta
        self.kind = kind
        self.sft_weight = sft_weight
        self.table = table

    def __call__(self, model, batch: dict, pairs: list[int] | None = None, split: str = "train") -> PreferenceLoss:
        batch = self._with_features(batch)
        if self.table is not None and pairs is not None:
            reference = self.table.lookup(split, pairs, batch["input_ids"].device)
        else:
            reference = self.reference_logps(model, batch)
        out = model(**batch, per_sample_grad=True)
        policy, tokens = -out.loss_sum_per_sample, out.label_tokens_per_sample
        half = policy.shape[0] // 2
        return preference_loss(
            policy[:half], policy[half:], reference[:half], reference[half:], beta=self.beta, kind=self.kind,
            chosen_tokens=tokens[:half], rejected_tokens=tokens[half:], sft_weight=self.sft_weight,
        )

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        """``[2P]``: the reference's summed log-probability of every answer of the batch (chosen rows, then rejected)."""
        batch = self._with_features(batch)
        with self.reference.active():
            return -model(**batch).loss_sum_per_sample

    def _with_features(self, batch: dict) -> dict:
        """The batch with its images encoded by the frozen tower (once for both passes), unless the tower trains."""
        if batch.get("image_features") is None and not self.vlm.vision_trainable:
            batch = dict(batch)
            batch["image_features"] = self.vlm.encode_images(batch.pop("pixel_values"), batch.get("image_sizes"))
        return batch
