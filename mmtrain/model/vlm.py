"""The vision-language model: vision encoder -> projector -> language model.

Every part is a registered submodule, the frozen vision encoder included, so ``.to()``,
``.eval()``, ``state_dict()`` and ``named_parameters()`` see the whole model. What the
DeepSpeed engine sees is decided elsewhere, in one place
(:class:`mmtrain.training.engine_view.EngineView`): a frozen encoder stays outside it,
is never partitioned by ZeRO-3, runs under ``no_grad``, and a rank whose batch has no
image skips it. That removes the ZeRO-3 hang of mixed text/image batches at the root
instead of pushing dummy images through the encoder. With vision LoRA the encoder
trains inside the engine; a rank without images then runs it on one blank image whose
features are discarded, so it gathers (and releases) exactly the same parameters as its
peers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.compat import torch as torch_compat
from mmtrain.batch import IGNORE_INDEX, label_positions
from mmtrain.image_tokens import ImageTokens
from mmtrain.model.anyres import NEWLINE, pack_tiles
from mmtrain.model.native_aspect import valid_rows
from mmtrain.model import shared_prompt
from mmtrain.model.attention import decoder_kwargs
from mmtrain.model.video import patch_grid, pool_frames
from mmtrain.model.vision import FusedVisionEncoder, VisionEncoder


@dataclass
class VLMOutput(ModelOutput):
    loss: torch.Tensor | None = None  # mean over label tokens of this batch (0 when it has none)
    num_label_tokens: torch.Tensor | None = None  # for token-weighted averages across batches
    loss_sum_per_sample: torch.Tensor | None = None  # [B] summed token losses (exact eval averages; a graph only when asked)
    label_tokens_per_sample: torch.Tensor | None = None  # [B]
    logits: torch.Tensor | None = None  # only when asked: [B, L, vocab]


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        vision_encoder: VisionEncoder | FusedVisionEncoder,
        projector: nn.Module,
        language_model: nn.Module,
        image_tokens: ImageTokens,
        *,
        vision_trainable: bool,
        video_pool: int = 0,
    ):
        super().__init__()
        self.video_pool = video_pool  # 0: no videos; k: each frame's patch grid pooled k x k (mmtrain.model.video)
        self.projector = projector
        self.language_model = language_model
        self.image_tokens = image_tokens
        self.vision_trainable = vision_trainable
        self.vision_encoder = vision_encoder

    @property
    def vision(self) -> VisionEncoder | FusedVisionEncoder:
        return self.vision_encoder

    def encode_images(self, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """Vision features ``[num_images, num_patches, vision_dim]`` (no graph when frozen).

        At native aspect ratios (``image_tokens.native``) each image's patch grid follows
        from its size: ``image_sizes`` are needed, and each image's rows past its own
        patches are padding.
        """
        vision = self.vision
        native = self.image_tokens.native
        if native is not None and pixel_values.shape[0]:
            if image_sizes is None:
                raise ValueError("a model reading images at their native aspect ratio needs the batch's image_sizes")
            grids = [native.grid(tuple(s)) for s in _pairs(image_sizes)]
            run = functools.partial(vision, grids=grids)
        else:
            run = vision
        dtype = next(vision.parameters()).dtype
        if self.vision_trainable:
            if pixel_values.shape[0] == 0:
                # The fallback for a trained (LoRA) encoder: its attention cannot run on an
                # empty batch, and under ZeRO-3 every rank must run it. One blank image goes
                # through and contributes exactly zero (its features are sliced away).
                blank = pixel_values.new_zeros(1, *vision.pixel_shape, dtype=dtype)
                features = vision(blank)
                return features[:0] + 0.0 * features.sum()
            return run(pixel_values.to(dtype))
        if pixel_values.shape[0] == 0:
            return pixel_values.new_zeros(0, vision.num_patches, vision.hidden_size, dtype=dtype)
        with torch.no_grad():
            return run(pixel_values.to(dtype))

    def image_positions(self, image_features: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """The projected features of every image position, image after image: ``[positions, lm_dim]``.

        Without tiles an image's positions are its projected patches; with AnyRes tiles
        (``image_sizes`` given) they are its base tile's, then its unpadded grid's with a
        newline per row (:func:`mmtrain.model.anyres.pack_tiles`).
        """
        native = self.image_tokens.native
        if native is not None:  # each image's own patches, then token by token through the projector
            grids = [native.grid(tuple(s)) for s in _pairs(image_sizes)] if image_features.shape[0] else []
            return self.projector(valid_rows(image_features, grids).to(self._projector_dtype()))
        projected = self.projector(image_features.to(self._projector_dtype()))
        anyres = self.image_tokens.anyres
        if anyres is None:
            return projected.reshape(-1, projected.shape[-1])
        if image_sizes is None:
            raise ValueError("a model with AnyRes tiles needs the batch's image_sizes")
        newline = getattr(self.projector, NEWLINE)
        if deepspeed_compat.is_zero3_partitioned(newline) and newline.numel() == 0:
            # ZeRO-3 released it after the projector's forward (generation reads it outside any
            # forward the engine hooks): gather it for this read.
            import deepspeed

            with deepspeed.zero.GatheredParameters([newline], modifier_rank=None):
                return pack_tiles(projected, image_sizes, anyres, newline)
        return pack_tiles(projected, image_sizes, anyres, newline)

    def video_positions(self, frame_features: torch.Tensor) -> torch.Tensor:
        """The projected features of every video position, frame after frame: ``[positions, lm_dim]``.

        ``frame_features`` are the encoder's ``[frames, patches, D]``; they are pooled on the
        patch grid (``video_pool``) before the projector, as LLaVA-NeXT-Video pools.
        """
        pooled = pool_frames(frame_features, patch_grid(self.vision), self.video_pool)
        projected = self.projector(pooled.to(self._projector_dtype()))
        return projected.reshape(-1, projected.shape[-1])

    def embed(
        self, input_ids: torch.Tensor, image_features: torch.Tensor, image_repeats: int = 1, image_sizes=None,
        video_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image k's projected features written on the k-th image span.

        ``video_positions`` (:meth:`video_positions`), when given, are written on the
        ``<video>`` positions in the same way: video k on the k-th video span.

        ``image_repeats`` > 1: the features are those of the first ``1 / image_repeats`` of
        the rows, whose images the later rows repeat in the same order (a preference
        pair's two answers to one prompt): each image is encoded and projected once.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        projected = self.image_positions(image_features, image_sizes)
        if image_repeats > 1:
            projected = projected.repeat(image_repeats, 1)
        streams = [(self.image_tokens.image_id, projected, "<image>", "images")]
        if self.image_tokens.video_id is not None:  # a batch without videos is checked to have no video span
            streams.append((self.image_tokens.video_id, projected[:0] if video_positions is None else video_positions, "<video>", "videos"))
        elif video_positions is not None:
            raise ValueError("the batch has videos but this model reads none (its video_pool is 0)")
        for token_id, positions, token, what in streams:
            is_token = input_ids == token_id
            features = positions.shape[0]
            if input_ids.device.type == "cpu" or not torch.is_grad_enabled():
                expected = int(is_token.sum())
                if expected != features:
                    raise ValueError(f"batch has {expected} {token} token positions but its {what} give {features} features")
            else:
                # Training on an accelerator: the same check without making the host wait
                # for the device (the collator builds spans and pixels together).
                torch_compat.assert_async(is_token.sum() == features, f"{token} token positions and {what}' features differ in number")
            # The n-th position of the token in row-major order takes feature row n, so
            # image (or video) k lands on span k. This is masked_scatter's placement, written
            # as a gather and a select: masked_scatter's backward (masked_select) reads a
            # count back from the device, which would stall every training step.
            flat = positions.to(embeds.dtype)
            if flat.shape[0]:
                order = (is_token.flatten().cumsum(0) - 1).clamp(min=0).view(is_token.shape)
                placed = flat.index_select(0, order.flatten()).view_as(embeds)  # backward: index_add, no read-back
                embeds = torch.where(is_token[..., None], placed, embeds)
        if projected.numel() == 0:
            # Keep the projector in the graph with a zero contribution so every rank
            # produces (zero) gradients for it; ZeRO's reductions then match across ranks.
            embeds = embeds + 0.0 * projected.sum()
        return embeds

    def _projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,  # part of the batch contract; spans carry the order
        image_sizes: list | None = None,  # with AnyRes tiles or native aspect: each image's (height, width), host-side
        pixel_values_videos: torch.Tensor | None = None,  # every video's frames, video after video
        video_frames: torch.Tensor | None = None,  # part of the batch contract: frames of each video; spans carry the order
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        label_positions: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        max_segment_len: int | None = None,
        label_samples: torch.Tensor | None = None,
        num_samples: int | None = None,
        branch_ids: torch.Tensor | None = None,  # shared-prompt pairs (mmtrain.model.shared_prompt), with the three below
        kv_index: torch.Tensor | None = None,
        kv_cu_seq_lens: torch.Tensor | None = None,
        max_kv_segment_len: int | None = None,
        right_padded: bool = False,
        sequence_shard: tuple[int, int] | None = None,
        image_repeats: int = 1,
        return_logits: bool = False,
        per_sample_grad: bool = False,
        **lm_kwargs,
    ) -> VLMOutput:
        if document_ids is not None:
            # A packed batch (see mmtrain.batch): the samples of a row are told apart
            # by position_ids restarting at 0. transformers turns those restarts into a
            # block-diagonal causal mask, but only when no 2D attention mask is given.
            if position_ids is None:
                raise ValueError("a packed batch (document_ids) needs position_ids restarting at 0 per sample")
            attention_mask = None
        elif right_padded and not return_logits:
            # See the collator's batch contract: causal attention alone already keeps
            # every real token off the padding, and SDPA keeps its causal kernel.
            attention_mask = None
        frames = 0 if pixel_values_videos is None else pixel_values_videos.shape[0]
        frame_features = None
        if image_features is None:
            if pixel_values is None:
                vision = self.vision
                pixel_values = torch.zeros(0, *vision.pixel_shape, device=input_ids.device)
            if frames:
                # One encoder call for images and frames (same input size): under ZeRO-3 a
                # trained encoder then gathers its weights once per step on every rank.
                both = self.encode_images(torch.cat([pixel_values, pixel_values_videos.to(pixel_values.dtype)]))
                image_features, frame_features = both[: pixel_values.shape[0]], both[pixel_values.shape[0] :]
            else:
                image_features = self.encode_images(pixel_values, image_sizes)
        elif frames:
            frame_features = self.encode_images(pixel_values_videos)
        video = None if frame_features is None else self.video_positions(frame_features)
        embeds = self.embed(input_ids, image_features, image_repeats, image_sizes, video_positions=video)
        kv = {}
        if kv_index is not None:  # a pair's prompt once, its answers as two branches
            attention_mask, kv = shared_prompt.decoder_inputs(
                self.language_model, document_ids, branch_ids, kv_index, kv_cu_seq_lens, max_kv_segment_len, embeds.dtype
            )
        lm_kwargs = {**decoder_kwargs(self.language_model, input_ids, self.image_tokens.image_id, cu_seq_lens, max_segment_len, kv), **lm_kwargs}
        if sequence_shard is not None:
            # Sequence parallelism (mmtrain.data.sequence_shard): the whole row was embedded,
            # images included; this process computes the LM on its own columns, and the
            # attention layers exchange the rest with the group. Every position is told by
            # its position_id (the batch's are already this process's columns), never a mask.
            rank, size = sequence_shard
            width = input_ids.shape[1] // size
            embeds = embeds[:, rank * width : (rank + 1) * width].contiguous()  # a copy: the whole row's embeddings are freed
            attention_mask = None
        body = self.language_model.get_decoder()
        hidden = body(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **lm_kwargs
        ).last_hidden_state
        head = self.language_model.get_output_embeddings()
        logits = head(hidden) if return_logits else None
        if labels is None:
            zero = hidden.new_zeros(())
            return VLMOutput(loss=zero, num_label_tokens=zero, logits=logits)
        # per_sample_grad: a preference objective differentiates each row's summed log-probability.
        loss, count, per_sample, per_sample_count = causal_lm_loss(
            hidden, labels, head, label_positions, per_sample_grad=per_sample_grad, samples=label_samples, num_samples=num_samples,
            shifted=sequence_shard is not None,
        )
        return VLMOutput(loss, count, per_sample, per_sample_count, logits)


def _pairs(image_sizes) -> list[tuple[int, int]]:
    """A batch's image sizes (a list of pairs, or a host tensor ``[n, 2]``) as ``(height, width)`` tuples."""
    return [tuple(s) for s in (image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes)]


def causal_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, positions: torch.Tensor | None = None, *,
    per_sample_grad: bool = False, samples: torch.Tensor | None = None, num_samples: int | None = None, shifted: bool = False,
):
    """Next-token cross-entropy evaluated only where a label is set.

    Prompt, image and padding positions never reach the output head, so no
    ``[batch, seq, vocab]`` fp32 logits are formed for them; in a VLM batch most positions
    are image or prompt tokens. ``positions`` are the flat indices of the set targets in
    ``labels[:, 1:]`` (the collators' ``label_positions``); given, nothing here waits for
    the device. Returns the mean loss, the number of label tokens, and per-sample loss
    sums and label counts; the sums are detached unless ``per_sample_grad``. A sample is
    a row, or with ``samples`` (each position's sample, of ``num_samples``) a packed one.

    ``shifted``: ``labels`` are already the targets of ``hidden``'s positions (``labels[:, t]``
    is predicted at position t, as a sequence-parallel shard holds them) and ``positions``
    index that grid.
    """
    if shifted:
        targets = labels
        if positions is None:
            positions = (labels != IGNORE_INDEX).flatten().nonzero().flatten()
    else:
        targets = labels[:, 1:]
        if positions is None:
            positions = label_positions(labels)
    positions = positions.to(hidden.device)
    rows = torch.div(positions, targets.shape[1], rounding_mode="floor")
    # Target (row, col) is predicted from hidden (row, col): in the unshifted [B, L] grid
    # that is flat index position + row, which indexes a view of ``hidden`` (no copy).
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions if shifted else positions + rows)
    logits = head(picked).float()
    token_losses = nn.functional.cross_entropy(logits, targets.reshape(-1).index_select(0, positions), reduction="none")
    owner, owners = (rows, labels.shape[0]) if samples is None else (samples.to(hidden.device), num_samples)
    per_sample = hidden.new_zeros(owners, dtype=token_losses.dtype).index_add(0, owner, token_losses if per_sample_grad else token_losses.detach())
    per_sample_count = torch.zeros_like(per_sample, dtype=torch.long).index_add(0, owner, torch.ones_like(owner))
    count = per_sample_count.sum()
    return token_losses.sum() / count.clamp(min=1), count, per_sample, per_sample_count
