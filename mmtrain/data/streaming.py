"""``--streaming``: training records read from many shard files as a stream, resumable to the sample.

Nothing is read up front: host memory holds one shuffle buffer, whatever the dataset's
size. The pieces, each from the library made for it where one fits:

* the shards (``--dataset_names`` globs of ``.jsonl`` / ``.parquet`` / ``.arrow`` files,
  or ``.tar`` files in the WebDataset layout, see :mod:`mmtrain.data.tar_shards`) become one
  ``datasets`` streaming :class:`datasets.IterableDataset` per epoch, its shard order
  permuted from ``--seed`` and the epoch, and ``split_dataset_by_node`` gives every
  process its own part (whole shards when their count divides by the process count,
  every P-th record otherwise);
* a seeded shuffle buffer of ``--shuffle_buffer_size`` records mixes them, a different
  order every epoch. It is ours, not ``IterableDataset.shuffle``: that one's
  ``state_dict`` leaves the buffer out and refills it on resume, so a resumed run would
  train on other samples than the uninterrupted one;
* :meth:`ShardStream.state_dict` is the ``datasets`` stream's position (shard and record
  in it), the buffered records, a record handed back by a token budget's micro-batch
  (:meth:`ShardStream.hold_back`) and the buffer's RNG: a checkpoint stores it per process
  and the resumed run continues with the next sample. The records before the position
  in its shard are read again by ``datasets`` to get there, but not parsed.

A Parquet or Arrow shard's embedded images (``datasets.Image`` values) never enter the
buffer: each waits there as a reference to its shard, row and column
(:mod:`mmtrain.data.images`), read back from the shard when the sample is encoded.

Every record keeps a stable id, ``shard:record``, which ``--record_samples`` writes. A
record that is not valid JSON (a truncated shard, say) names its shard, record and byte
offset; under ``--on_bad_sample skip`` the rest of that shard is skipped and counted.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np

from mmtrain.data.dataset import BadImageError
from mmtrain.data.formats import DataError, normalize_record
from mmtrain.data.images import strip_embedded, without_image_bytes
from mmtrain.data.tar_shards import read_tar

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".jsonl", ".parquet", ".arrow", ".tar")
# Rows of a Parquet or Arrow shard read at once: their embedded images are dropped as each batch is read.
TABLE_BATCH = 64


def shard_files(patterns: list[str], folders: list[str]) -> list[tuple[str, str | None]]:
    """``(shard path, image folder)`` of every file the ``--dataset_names`` globs match, sorted per glob."""
    found = []
    for i, pattern in enumerate(patterns):
        folder = folders[0] if len(folders) == 1 else (folders[i] if folders else None)
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            folder_hint = f" (a folder streams as its shard files, e.g. {os.path.join(pattern, '*.arrow')})" if os.path.isdir(pattern) else ""
            raise DataError(f"--dataset_names {pattern!r} matches no shard file{folder_hint}")
        for path in paths:
            if not path.endswith(SHARD_SUFFIXES):
                raise DataError(f"--dataset_names {pattern!r}: shard {path} is not {' or '.join(SHARD_SUFFIXES)}")
            found.append((path, folder))
    return found


def _read_shards(shards: list[str]):
    """The generator behind the ``datasets`` stream: every record of every shard, as raw text, with where it is.

    ``images`` (a JSON list) is set for tar shards only, whose images are members of the
    tar; ``error`` reports a tar that cannot be read on.
    """
    for path in shards:
        if path.endswith(".tar"):
            yield from read_tar(path)
            continue
        if path.endswith((".parquet", ".arrow")):
            yield from _read_table(path)
            continue
        with open(path, "rb") as f:
            offset, index = 0, 0
            for line in f:
                if line.strip():
                    yield {"source": path, "index": index, "offset": offset, "line": line.decode("utf-8", errors="replace"), "images": "", "error": ""}
                    index += 1
                offset += len(line)


def _read_table(path: str):
    """The rows of a Parquet or Arrow (``datasets``' stream format) shard, read by pyarrow, each as JSON text.

    An embedded image is replaced by where it lies (:func:`mmtrain.data.images.strip_embedded`),
    so the text that waits in the shuffle buffer, and in every checkpoint of it, holds none.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(index: int, values: dict | None, error: str = "") -> dict:
        line = json.dumps(strip_embedded(values, path, index), default=str) if values is not None else ""
        return {"source": path, "index": index, "offset": -1, "line": line, "images": "", "error": error}

    index = 0
    try:
        if path.endswith(".parquet"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=TABLE_BATCH)
            for batch in batches:
                for values in without_image_bytes(batch).to_pylist():
                    yield row(index, values)
                    index += 1
        else:
            with pa.memory_map(path) as source:
                for batch in pa.ipc.open_stream(source):
                    for start in range(0, batch.num_rows, TABLE_BATCH):
                        for values in without_image_bytes(batch.slice(start, TABLE_BATCH)).to_pylist():
                            yield row(index, values)
                            index += 1
    except (OSError, pa.ArrowException) as err:
        where = f"after record {index - 1}" if index else "before its first record"
        yield row(index, None, f"{path}: shard cannot be read {where}: {err}")


class ShardStream:
    """One process's part of the shards, as training items in a seeded, resumable order.

    ``encode(record) -> item | None`` turns a canonical record into a training item
    (None: dropped by the over-length policy). Iterate with :meth:`start` then
    :meth:`next_item`; :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    position.
    """

    def __init__(
        self, shards: list[tuple[str, str | None]], encode, *, rank: int, world_size: int, seed: int, buffer_size: int, on_bad_sample: str,
        columns: dict | None = None,
    ):
        self.shards = shards
        self.columns = columns or {}
        self.folders = dict(shards)
        self.encode = encode
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.buffer_size = buffer_size
        self.on_bad_sample = on_bad_sample
        self.skipped_bad_samples = 0  # records and images skipped under --on_bad_sample skip
        self.skipped_shards: list[str] = []
        self.epoch = 0
        self._source = None
        self._iterator = None
        self._buffer: list[dict] = []
        self._rng = None
        self._restored: dict | None = None
        self._last: dict | None = None  # the raw record of the item next_item returned last
        self._held: dict | None = None  # a record handed back (hold_back), returned again first

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def part(self, index: int, count: int) -> ShardStream:
        """Part ``index`` of ``count`` of this process's part, for one loader worker: split as if there were ``count`` times the processes.

        Its shuffle buffer and RNG are its own, seeded from the seed, the epoch and
        ``rank * count + index``; with ``count == 1`` it reads what this stream reads.
        """
        part = ShardStream(
            self.shards, self.encode, rank=self.rank * count + index, world_size=self.world_size * count, seed=self.seed,
            buffer_size=self.buffer_size, on_bad_sample=self.on_bad_sample, columns=self.columns,
        )
        part.epoch = self.epoch
        return part

    def _stream(self, epoch: int):
        from datasets import IterableDataset
        from datasets.distributed import split_dataset_by_node

        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        paths = [self.shards[i][0] for i in order]
        stream = IterableDataset.from_generator(_read_shards, gen_kwargs={"shards": paths})
        return split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)

    def start(self) -> bool:
        """Begin the current epoch, or continue it from a loaded state (then True)."""
        self._source = self._stream(self.epoch)
        self._rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        self._buffer = []
        self._held = None
        restored, self._restored = self._restored, None
        if restored is not None and restored["epoch"] == self.epoch:
            self._source.load_state_dict(restored["source"])
            self._buffer = restored["buffer"]
            self._held = restored.get("held")
            self._rng.bit_generator.state = restored["rng"]
            self.skipped_shards = restored["skipped_shards"]
        # Iterated directly inside a DataLoader worker, a ``datasets`` stream splits itself once
        # more among the workers by shard; a worker here already reads its own part
        # (:meth:`part`), and ``iter`` reads a stream without that split.
        self._iterator = ({key: values[0] for key, values in batch.items()} for batch in self._source.iter(batch_size=1))
        return restored is not None and restored["epoch"] == self.epoch

    def _pull(self) -> dict | None:
        """The next raw record of this process's part that is not in a skipped shard, or None at its end."""
        for raw in self._iterator:
            if raw["source"] in self.skipped_shards:
                self.skipped_bad_samples += 1
            elif raw.get("error"):
                # A shard that cannot be read on is reported as the reader reaches the damage,
                # not when the buffer happens to pick the row that says so. It is that shard's
                # last row, so its whole samples before the damage still train.
                if self.on_bad_sample != "skip":
                    raise DataError(raw["error"])
                self._count_skip(f"{raw['error']}; the rest of this shard is skipped")
            else:
                return raw
        return None

    def _next_raw(self) -> dict | None:
        """The shuffle buffer: filled to its size, then a seeded pick that the next record replaces."""
        while len(self._buffer) < self.buffer_size:
            raw = self._pull()
            if raw is None:
                break
            self._buffer.append(raw)
        if not self._buffer:
            return None
        j = int(self._rng.integers(len(self._buffer)))
        picked = self._buffer[j]
        refill = self._pull()
        if refill is None:
            self._buffer[j] = self._buffer[-1]
            self._buffer.pop()
        else:
            self._buffer[j] = refill
        return picked

    def next_item(self) -> tuple[str, dict] | None:
        """``(stable id, item)`` of the next sample, or None when this process's part of the epoch is over."""
        while True:
            raw, self._held = self._held or self._next_raw(), None
            if raw is None:
                return None
            if raw["source"] in self.skipped_shards:
                self.skipped_bad_samples += 1
                continue
            sample_id = f"{raw['source']}:{raw['index']}"
            try:
                record = normalize_record(self._parse(raw), raw["source"], raw["index"], self._folder(raw["source"]), self.columns)
                item = self.encode(record)
            except BadImageError as err:
                if self.on_bad_sample != "skip":
                    raise
                self._count_skip(err)
                continue
            except DataError as err:
                if self.on_bad_sample != "skip":
                    raise
                self.skipped_shards.append(raw["source"])
                self._count_skip(f"{err}; the rest of this shard is skipped")
                continue
            if item is not None:
                self._last = raw
                return sample_id, item

    def hold_back(self) -> None:
        """Hand the item :meth:`next_item` returned last back: the next call returns it again (a token budget's overflow)."""
        self._held = self._last

    def _parse(self, raw: dict) -> dict:
        if raw.get("images") and not raw["line"]:
            raise DataError(f"{raw['source']}: sample {raw['index']} (byte {raw['offset']}) has no .json member")
        try:
            record = json.loads(raw["line"])
        except json.JSONDecodeError as err:
            where = f"byte {raw['offset']}" if raw["offset"] >= 0 else "in the file"
            raise DataError(f"{raw['source']}: record {raw['index']} ({where}) is not valid JSON, truncated or damaged: {err.msg}") from None
        if raw.get("images") and isinstance(record, dict):
            # A tar sample's images are its own members, whatever names its record gives.
            record.pop("image", None)
            record["images"] = json.loads(raw["images"])
        return record

    def _folder(self, source: str) -> str:
        return self.folders.get(source) or os.path.dirname(os.path.abspath(source))

    def _count_skip(self, err) -> None:
        self.skipped_bad_samples += 1
        if self.skipped_bad_samples <= 10:
            logger.warning("skipping a bad sample (--on_bad_sample skip): %s", err)

    def state_dict(self) -> dict:
        """Where this process is: the epoch, the ``datasets`` stream's position, the buffered and held-back records and the RNG."""
        return {
            "epoch": self.epoch,
            "source": self._source.state_dict() if self._source is not None else None,
            "buffer": list(self._buffer),
            "held": self._held,
            "rng": self._rng.bit_generator.state if self._rng is not None else None,
            "skipped_shards": list(self.skipped_shards),
            "skipped_bad_samples": self.skipped_bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` at the next :meth:`start` of its epoch."""
        self.epoch = state["epoch"]
        self.skipped_bad_samples = state["skipped_bad_samples"]
        self._restored = state if state["source"] is not None else None
