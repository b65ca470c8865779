"""The batch contract between data and model: what a batch holds and means.

Both sides import it from here (``mmtrain.data`` builds batches, ``mmtrain.model``
consumes them); neither imports the other for it.

==================  =====================  ===================================================
key                 shape / dtype          meaning
==================  =====================  ===================================================
``input_ids``       [B, L] long            token ids, right-padded with the pad id
``attention_mask``  [B, L] long            1 on real tokens, 0 on padding
``labels``          [B, L] long            target ids; -100 where no loss is taken
``pixel_values``    [N, 3, H, W] float     every image of the batch, sample by sample, in
                                           placeholder order; N may be 0 (see
                                           ``image_repeats`` for pairs)
``image_counts``    [B] long               images of each row; sums to N
==================  =====================  ===================================================

Optional keys (:data:`OPTIONAL_KEYS`):

* ``label_positions`` [K] long: the flat indices, in the ``[B, L - 1]`` grid of
  next-token targets (``labels[:, 1:]``), of the K targets that are not -100. The
  collators of ``mmtrain.data`` add it. It is computed on the CPU, so the model picks the positions
  that reach the output head without reading a count back from the GPU (a boolean-mask
  index would wait for the GPU to finish everything queued before it). Without it the
  model derives the same positions from ``labels``.
* ``right_padded`` (a Python ``True``, not a tensor): every row's padding comes after
  all its real tokens. :class:`Collator` sets it. Under causal attention a real token
  then never sees a padding key, so the model drops the padding mask and attention
  keeps its causal kernel (the masked one computes every block of the square). Padding
  positions carry no label, so what they compute is never used.
* ``image_repeats`` (a Python int > 1): the rows are that many groups of equal size
  whose images are the same, in the same order (a preference pair's chosen rows, then
  its rejected rows). ``pixel_values`` holds the first group's images once and the
  model reuses their features for the other groups; ``image_counts`` still has one
  entry per row. :class:`mmtrain.data.preference.PairCollator` sets it.
* ``image_sizes`` (a Python list of N ``(height, width)`` int pairs, kept on the host: the
  model lays tiles out from them without reading anything back from the device): with
  AnyRes tiles, each image's original size;
  ``pixel_values`` then holds each image's tiles (its whole image first), image after
  image, ``image_counts`` still counts images, and an image's span has
  ``ImageTokens.count(size)`` positions (:mod:`mmtrain.image_tokens`).
* ``pixel_values_videos`` [F, 3, H, W] float and ``video_frames`` [V] long: where the
  batch has videos, the frames of every video (at the encoder's own size, never tiled),
  video after video in ``<video>`` placeholder order, row after row, and each video's
  frame count (summing to F). Video k's features go on ``<video>`` span k, which has
  ``video_frames[k] * ImageTokens.per_frame`` positions; images keep their own spans.
  A batch without videos has neither key.
* A packing collator (several samples per row) adds ``position_ids`` [B, L]
  (restarting at 0 for each packed sample) and ``document_ids`` [B, L] (which packed
  sample a token belongs to, for a block-diagonal attention mask) and keeps the keys
  above with the same meaning. It also adds ``cu_seq_lens`` [S + 1] int32: the
  cumulative starts of the S segments of the rows read end to end as one stream of
  ``B * L`` tokens (each packed sample, and each row's padding tail, is a segment), and
  ``max_segment_len`` (a Python int), the longest segment. The model's variable-length
  attention kernels take the samples apart by these instead of a mask
  (``mmtrain.model.varlen_attention``).
* ``label_samples`` [K] long and ``num_samples`` (a Python int): which of the batch's
  ``num_samples`` samples each target of ``label_positions`` belongs to, where samples
  are not rows (a token budget's pairs packed into one row): the model's per-sample loss
  sums are then per sample, in this numbering.
  :class:`mmtrain.data.preference.PairPackingCollator` sets them.
* ``branch_ids`` [B, L] long, ``kv_index`` [Tk] long, ``kv_cu_seq_lens`` [S + 1] int32 and
  ``max_kv_segment_len`` (a Python int): rows of preference pairs each laid out as its
  prompt once, then its chosen and its rejected answer as two branches of it
  (:mod:`mmtrain.model.shared_prompt`; :class:`mmtrain.data.preference.SharedPromptCollator`
  sets them, with ``position_ids`` continuing the prompt's in each branch,
  ``document_ids`` numbering the pairs of a row, ``label_samples``/``num_samples`` and
  ``cu_seq_lens``). ``branch_ids``: 0 prompt, 1 chosen, 2 rejected, -1 padding;
  ``cu_seq_lens`` are the query segments (each pair's prompt with its chosen branch, then
  its rejected branch, then each padding tail) and ``kv_index`` the flat token indices of
  the keys each segment attends to (the prompt again before the rejected branch), cut by
  ``kv_cu_seq_lens``. A target inside a prompt is listed twice in ``label_positions``,
  once for each answer.
* ``sequence_shard`` (a Python tuple ``(rank, size)``): this process computes the LM on
  columns ``rank`` of ``size`` equal, consecutive parts of each row, the other parts on
  the other processes of its sequence-parallel group
  (:mod:`mmtrain.data.sequence_shard`). ``input_ids``, ``pixel_values``,
  ``image_counts``, ``document_ids``, ``cu_seq_lens`` and ``max_segment_len`` stay the
  whole row's (every process embeds the whole row; attention sees all of it). Cut to
  the process's ``L / size`` columns: ``attention_mask``; ``position_ids`` (each token's
  position in its sample, set for every row); ``labels``, which then hold the *shifted*
  targets (``labels[:, t]`` is the token predicted at column t, -100 where none is); and
  ``label_positions``, the flat indices of the set targets in that ``[B, L / size]``
  grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

IGNORE_INDEX = -100  # label of a position that takes no loss (the value PyTorch's cross-entropy skips)

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_counts")
OPTIONAL_KEYS = (
    "label_positions", "right_padded", "image_repeats", "position_ids", "document_ids", "cu_seq_lens", "max_segment_len",
    "label_samples", "num_samples", "image_sizes", "sequence_shard", "pixel_values_videos", "video_frames",
    "branch_ids", "kv_index", "kv_cu_seq_lens", "max_kv_segment_len",
)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the set targets in ``labels[:, 1:]`` (see ``label_positions`` above)."""
    return (labels[:, 1:] != IGNORE_INDEX).flatten().nonzero().flatten()


class BatchCollator(ABC):
    """A callable from a list of dataset items to a batch dict following the contract above."""

    output_keys: tuple[str, ...] = BATCH_KEYS

    @abstractmethod
    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]: ...
