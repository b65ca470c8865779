"""The torch Dataset: canonical records in, token ids + labels + pixel values out.

Records are held in an Arrow table (``datasets``); images stay where they lie (files, or
cells of the memory-mapped datasets they came from, read through an
:class:`~mmtrain.data.images.ImageStore`) and are decoded in ``__getitem__`` (so in
DataLoader workers), never kept in memory.

Each *entry* is a record plus how many of its question/answer pairs are kept (the
over-length policy may drop trailing ones). With ``concatenate > 1`` each item joins
1..N entries into one multi-image conversation, regrouped every epoch from
``seed + epoch`` by :meth:`ConversationDataset.set_epoch`.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# the decoding functions, re-exported where they were first defined
from mmtrain.data.decode import (  # noqa: F401
    BadImageError,
    decode_images,
    decode_videos,
    image_shape,
    image_size,
    load_images,
    pixel_inputs,
    video_inputs,
)
from mmtrain.data.images import ImageStore
from mmtrain.data.template import IGNORE_INDEX, encode_conversation
from mmtrain.image_tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageTokens

logger = logging.getLogger(__name__)

# Upper bound of the extra tokens an image header costs when renumbering moves it to a
# longer number ("### Image 1:" -> "### Image 12:"): keeps concatenation's length
# estimate safe without re-tokenising anything.
_RENUMBER_SLACK = 2


@dataclass(frozen=True)
class Entry:
    """A record as it enters a sample: its row, the pairs kept, and its token/image counts."""

    row: int
    keep_pairs: int
    length: int
    num_images: int  # encoder inputs: its images and its videos' frames (what an image budget counts)
    prefix_length: int
    both_halves: int = 0  # a preference pair's tokens, both halves (its prompt once with --dpo_share_prompt): what a token budget counts


def split_turns(turns: list[dict]) -> tuple[dict | None, list[dict]]:
    """(system turn or None, the user/assistant turns)."""
    if turns and turns[0]["role"] == "system":
        return turns[0], turns[1:]
    return None, turns


def join_conversation(pairs: list[tuple[dict, Entry]]) -> tuple[list[dict], list[tuple[str, str, int]]]:
    """Turns and ``(image path, source, record index)`` of ``(record, entry)`` pairs, joined in order."""
    turns: list[dict] = []
    images: list[tuple[str, str, int]] = []
    for position, (record, entry) in enumerate(pairs):
        system, body = split_turns(record["turns"])
        body = body[: 2 * entry.keep_pairs]
        if position == 0 and system is not None:
            turns.append(system)  # a joined sample keeps the first record's system turn only
        turns += body
        used = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in body)
        images += [(path, record["source"], record["index"]) for path in record["images"][:used]]
    return turns, images


def join_videos(pairs: list[tuple[dict, Entry]]) -> list[tuple[str, str, int]]:
    """``(video, source, record index)`` of the videos the kept turns of ``(record, entry)`` pairs use, in order."""
    videos = []
    for record, entry in pairs:
        _, body = split_turns(record["turns"])
        used = sum(t["text"].count(VIDEO_PLACEHOLDER) for t in body[: 2 * entry.keep_pairs])
        videos += [(video, record["source"], record["index"]) for video in (record.get("videos") or [])[:used]]
    return videos


class ConversationDataset(torch.utils.data.Dataset):
    """Items ``{"input_ids": LongTensor[L], "labels": LongTensor[L], "pixel_values": FloatTensor[n, 3, H, W]}``.

    ``on_bad_sample="skip"``: an item whose image turns out unreadable when it is loaded
    (missing files were left out before any plan was made, in ``mmtrain.data.build``) is
    dropped, not replaced: it comes back as ``None``, which :class:`DropBadItems` takes
    out of its batch. Drops are counted in :attr:`skipped_bad_samples`, a counter shared
    with DataLoader workers.

    With ``concatenate > 1`` every epoch has its own number of items: its plan's.
    """

    def __init__(
        self,
        records,
        entries: list[Entry],
        tokenizer,
        image_tokens: ImageTokens,
        image_processor,
        *,
        template: str = "plain",
        system_prompt: str = "",
        max_seq_len: int = 2048,
        on_bad_sample: str = "error",
        concatenate: int = 1,
        max_images: int = 8,
        seed: int = 0,
        image_store: ImageStore | None = None,
        max_frames: int = 8,
        video_fps: float = 0.0,
    ):
        self.records = records
        self.max_frames = max_frames
        self.video_fps = video_fps
        self.image_store = image_store or ImageStore()
        self.entries = entries
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_processor = image_processor
        self.template = template
        self.system_prompt = system_prompt
        self.max_seq_len = max_seq_len
        self.on_bad_sample = on_bad_sample
        self.concatenate = concatenate
        self.max_images = max_images
        self.seed = seed
        self._empty_shape = image_shape(image_processor)
        # Shared with DataLoader workers: persistent workers keep their copy of the
        # dataset, so they read the epoch from here and regroup themselves.
        self._skipped = multiprocessing.Value("q", 0)
        self._epoch = multiprocessing.Value("q", 0)
        self._groups: list[tuple[int, ...]] | None = None
        self._groups_epoch = 0
        if concatenate > 1:
            # Each epoch keeps its own plan whole (none is cut or wrapped to epoch 0's length):
            # the samplers read the length when an epoch starts, after set_epoch.
            self._groups = self._plan(0)

    # ----- grouping -------------------------------------------------------------------

    def _plan(self, epoch: int) -> list[tuple[int, ...]]:
        """Shuffle entries with ``seed + epoch`` and join runs of 1..N within the limits."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.entries))
        groups, i = [], 0
        while i < len(order):
            target = int(rng.integers(1, self.concatenate + 1))
            first = self.entries[order[i]]
            group, length, images = [int(order[i])], first.length, first.num_images
            i += 1
            while len(group) < target and i < len(order):
                e = self.entries[order[i]]
                grown = length + e.length - e.prefix_length + _RENUMBER_SLACK * e.num_images
                if images + e.num_images > self.max_images or grown > self.max_seq_len:
                    break
                group.append(int(order[i]))
                length, images = grown, images + e.num_images
                i += 1
            groups.append(tuple(group))
        return groups

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Regroup concatenated samples for ``epoch`` (deterministic; a no-op without concatenation).

        Call it before iterating the epoch; workers, persistent ones included, follow.
        """
        self._epoch.value = epoch
        self._regroup()

    def _regroup(self) -> None:
        epoch = self.epoch
        if self.concatenate > 1 and epoch != self._groups_epoch:
            self._groups, self._groups_epoch = self._plan(epoch), epoch

    def epoch_length(self, epoch: int) -> int:
        """Items of ``epoch``: with concatenation its plan's groups, otherwise every entry."""
        if self.concatenate <= 1:
            return len(self.entries)
        return len(self._groups) if epoch == self._groups_epoch else len(self._plan(epoch))

    def group(self, i: int) -> tuple[int, ...]:
        """Entry indices that make item ``i`` this epoch."""
        if self._groups is None:
            return (i,)
        self._regroup()
        return self._groups[i]

    def item_sizes(self) -> list[tuple[int, int]]:
        """``(tokens, images)`` of every item this epoch, without encoding anything.

        A joined item's tokens are the bound its plan was made with (never fewer than
        the encoded item has), so a batch planned from them always fits.
        """
        sizes = []
        for i in range(len(self)):
            entries = [self.entries[e] for e in self.group(i)]
            tokens = entries[0].length + sum(e.length - e.prefix_length + _RENUMBER_SLACK * e.num_images for e in entries[1:])
            sizes.append((tokens, sum(e.num_images for e in entries)))
        return sizes

    # ----- items ----------------------------------------------------------------------

    @property
    def skipped_bad_samples(self) -> int:
        return int(self._skipped.value)

    def __len__(self) -> int:
        if self._groups is None:
            return len(self.entries)
        self._regroup()
        return len(self._groups)

    def conversation(self, group: tuple[int, ...]) -> tuple[list[dict], list[tuple[str, str, int]]]:
        """Turns and ``(image path, source, record index)`` of the entries in ``group``, joined in order."""
        return join_conversation([(self.records[self.entries[e].row], self.entries[e]) for e in group])

    def videos(self, group: tuple[int, ...]) -> list[tuple[str, str, int]]:
        """``(video, source, record index)`` of the entries in ``group``, joined in order."""
        return join_videos([(self.records[self.entries[e].row], self.entries[e]) for e in group])

    def _decode_videos(self, videos) -> list[list[Image.Image]]:
        return decode_videos(videos, self.max_frames, self.video_fps, self.image_store)

    def _encode(self, turns, add_generation_prompt=False, decoded=(), videos=()):
        # AnyRes: an image's span follows its size (extra sizes, of images a cut dropped, are not read)
        sizes = [(image.height, image.width) for image in decoded] if self.image_tokens.sized is not None else None
        return encode_conversation(
            turns,
            self.tokenizer,
            self.image_tokens,
            template=self.template,
            system_prompt=self.system_prompt,
            add_generation_prompt=add_generation_prompt,
            image_sizes=sizes,
            video_frames=[len(video) for video in videos],
        )

    def _item(self, group: tuple[int, ...]) -> dict:
        turns, images = self.conversation(group)
        decoded = decode_images(images, self.image_store)
        videos = self._decode_videos(self.videos(group))
        encoded = self._encode(turns, decoded=decoded, videos=videos)
        # The join was planned from a length bound; should a template still overshoot,
        # drop joined entries from the end rather than exceed --max_seq_len.
        while len(encoded.input_ids) > self.max_seq_len and len(group) > 1:
            group = group[:-1]
            turns, images = self.conversation(group)
            decoded = decoded[: len(images)]  # the images of a prefix of the group are a prefix of its images
            videos = videos[: len(self.videos(group))]  # and so are its videos
            encoded = self._encode(turns, decoded=decoded, videos=videos)
        return self._tensors(encoded, decoded, videos)

    def _tensors(self, encoded, decoded: list[Image.Image], videos: list[list[Image.Image]] = ()) -> dict:
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            **pixel_inputs(decoded, self.image_processor, self._empty_shape),
            **video_inputs(list(videos), self.image_processor),
        }

    def record_item(self, record: dict, entry: Entry) -> dict:
        """One canonical record that is not in the table (a streamed one) as an item; raises :class:`BadImageError`."""
        turns, images = join_conversation([(record, entry)])
        decoded = decode_images(images, self.image_store)
        videos = self._decode_videos(join_videos([(record, entry)]))
        return self._tensors(self._encode(turns, decoded=decoded, videos=videos), decoded, videos)

    def __getitem__(self, i: int) -> dict | None:
        """Item ``i``; ``None`` for one dropped under ``--on_bad_sample skip`` (never another item in its place)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        try:
            return self._item(self.group(i))
        except BadImageError as err:
            if self.on_bad_sample != "skip":
                raise
            with self._skipped.get_lock():
                self._skipped.value += 1
                count = self._skipped.value
            if count <= 10:
                logger.warning("dropping a bad sample (--on_bad_sample skip): %s", err)
            return None

    def placeholder_item(self) -> dict:
        """What stands in for a batch whose every item was dropped: one token, no image, nothing to learn (no label)."""
        token = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return {
            "input_ids": torch.tensor([token], dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX], dtype=torch.long),
            **pixel_inputs([], self.image_processor, self._empty_shape),
        }

    def generation_example(self, e: int) -> dict:
        """Entry ``e`` as a prompt for generation: the conversation up to its last question.

        Returns ``{"input_ids": LongTensor (ending with the answer cue), "pixel_values",
        "answer": the reference last answer, stripped}``; raises :class:`BadImageError`.
        """
        turns, images = self.conversation((e,))
        decoded = decode_images(images, self.image_store)
        videos = self._decode_videos(self.videos((e,)))
        encoded = self._encode(turns[:-1], add_generation_prompt=True, decoded=decoded, videos=videos)
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            **pixel_inputs(decoded, self.image_processor, self._empty_shape),
            **video_inputs(videos, self.image_processor),
            "answer": turns[-1]["text"].strip(),
        }


class DropBadItems:
    """Wrap a collator: items dropped by the dataset (``None``) leave their batch, which is collated smaller.

    A batch whose every item was dropped becomes the dataset's :meth:`~ConversationDataset.placeholder_item`:
    a step with nothing to learn, so that every process still runs the same steps.
    """

    def __init__(self, collator, placeholder):
        self.collator = collator
        self.placeholder = placeholder  # () -> an item as the dataset gives them
        self.output_keys = getattr(collator, "output_keys", ())

    def __call__(self, items: list):
        kept = [item for item in items if item is not None]
        return self.collator(kept or [self.placeholder()])
