"""Where a record's images lie: a file, a tar shard's member, or a cell of a dataset's rows.

Hub-shaped datasets (Parquet, Arrow, ``save_to_disk`` folders, the ``datasets`` cache)
keep their images inside the rows as ``datasets.Image`` values: ``{"bytes", "path"}``
structs, lists of them, or, read through ``datasets`` in Python, decoded PIL images. A
canonical record never holds those bytes. Its ``images`` are strings: a file path, or an
*embedded reference* (:func:`embedded_ref`) naming the dataset, row, column and position
in that column's list. :class:`ImageStore` reads the cell back when the sample is encoded
(in a DataLoader worker), so that neither the in-memory table, nor a stream's shuffle
buffer, nor the position a checkpoint saves ever holds an image: a memory-mapped Arrow
table is read where it lies, a Parquet shard one row group at a time.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict

EMBEDDED = "embedded:"
# Parquet row groups of one image column kept decompressed per process: a shuffle buffer
# picks from the last few groups read, so a handful saves re-reading each for every record.
ROW_GROUPS_KEPT = 4


def embedded_ref(source: str, row: int, column: str, position: int) -> str:
    """The image string of a record whose image is the ``position``-th value of ``column`` in row ``row`` of ``source``."""
    return EMBEDDED + json.dumps([source, row, column, position])


def parse_embedded(image: str) -> tuple[str, int, str, int] | None:
    """``(source, row, column, position)`` of an :func:`embedded_ref`, or None for a path."""
    if not image.startswith(EMBEDDED):
        return None
    source, row, column, position = json.loads(image[len(EMBEDDED):])
    return source, row, column, position


def describe(image: str) -> str:
    """How an error names the image: its path, or its column and position."""
    ref = parse_embedded(image)
    return image if ref is None else f"column {ref[2]!r} image {ref[3]}"


def is_image_struct(value) -> bool:
    """A ``datasets.Image`` value as Arrow stores it: a mapping of ``bytes`` and/or ``path`` and nothing else."""
    return isinstance(value, dict) and bool(value) and set(value) <= {"bytes", "path"}


def is_pil(value) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def strip_embedded(row: dict, source: str, index: int) -> dict:
    """``row`` with every embedded image (bytes, or a struct holding bytes) replaced by its :func:`embedded_ref`.

    What a stream keeps of a Parquet or Arrow row while it waits in the shuffle buffer:
    its text is JSON, its images are where they lie.
    """

    def strip(value, column: str, position: int):
        if isinstance(value, (bytes, bytearray)) or is_pil(value) or (is_image_struct(value) and value.get("bytes") is not None):
            return embedded_ref(source, index, column, position)
        return value

    out = {}
    for column, value in row.items():
        if isinstance(value, list):
            out[column] = [strip(v, column, k) for k, v in enumerate(value)]
        else:
            out[column] = strip(value, column, 0)
    return out


def without_image_bytes(batch):
    """A pyarrow table or record batch with each binary value (an image's bytes) replaced by ``b""``, nulls kept.

    What checking a record and placing its images need (:func:`strip_embedded` makes a
    reference of any bytes there are). Only validity bitmaps are read, so the images'
    pages of a memory-mapped table are never touched, nor copied into Python.
    """
    import pyarrow as pa

    return pa.table([_hollow(column) for column in batch.columns], names=batch.column_names)


def _hollow(array):
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        return pa.chunked_array([_hollow(chunk) for chunk in array.chunks], type=array.type)
    kind = array.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pc.if_else(pc.is_valid(array), pa.scalar(b"", kind), pa.scalar(None, kind))
    if pa.types.is_struct(kind):
        return pa.StructArray.from_arrays([_hollow(child) for child in array.flatten()], fields=list(kind), mask=array.is_null())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        build = pa.ListArray if pa.types.is_list(kind) else pa.LargeListArray
        return build.from_arrays(array.offsets, _hollow(array.values), type=kind, mask=array.is_null())
    return array


class ImageStore:
    """Reads embedded images back from the datasets they came from.

    ``tables`` maps a source name to the ``datasets.Dataset`` its records were read from
    (memory-mapped: pickling one to a DataLoader worker sends its file names, not its
    rows). A source not among them is a streamed shard, opened by its path: a ``.parquet``
    file one row group at a time, an ``.arrow`` file memory-mapped.
    """

    def __init__(self, tables: dict | None = None):
        self.tables = dict(tables or {})
        self._views: dict = {}
        self._parquet: dict = {}
        self._groups: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        return {"tables": self.tables}  # open files and decompressed groups stay with their process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tables"])

    def open(self, image: str):
        """The bytes (a file object) or the decoded PIL image an :func:`embedded_ref` names; raises ValueError when it holds neither."""
        source, row, column, position = parse_embedded(image)
        value = self._cell(source, row, column)
        if isinstance(value, list):
            if position >= len(value):
                raise ValueError(f"the column holds {len(value)} images, not {position + 1}")
            value = value[position]
        if is_pil(value):
            return value
        if isinstance(value, (bytes, bytearray)):
            return io.BytesIO(value)
        if is_image_struct(value) and value.get("bytes") is not None:
            return io.BytesIO(value["bytes"])
        raise ValueError("the cell holds no image bytes")

    def _cell(self, source: str, row: int, column: str):
        if source in self.tables:
            return self._table_cell(source, self.tables[source], row, column)
        if source.endswith(".parquet"):
            return self._parquet_cell(source, row, column)
        import datasets

        self.tables[source] = datasets.Dataset.from_file(source)  # an .arrow shard, memory-mapped
        return self._table_cell(source, self.tables[source], row, column)

    def _table_cell(self, source: str, table, row: int, column: str):
        view = self._views.get((source, column))
        if view is None:
            # Arrow format: the stored struct as it is, not decoded by the Image feature.
            view = self._views[(source, column)] = table.select_columns([column]).with_format("arrow")
        return view[row].column(0)[0].as_py()

    def _parquet_cell(self, path: str, row: int, column: str):
        import bisect

        import pyarrow.parquet as pq

        if path not in self._parquet:
            handle = pq.ParquetFile(path)
            starts, total = [], 0
            for g in range(handle.metadata.num_row_groups):
                starts.append(total)
                total += handle.metadata.row_group(g).num_rows
            self._parquet[path] = (handle, starts)
        handle, starts = self._parquet[path]
        group = bisect.bisect_right(starts, row) - 1
        key = (path, group, column)
        values = self._groups.get(key)
        if values is None:
            values = handle.read_row_group(group, columns=[column]).column(0)
            self._groups[key] = values
            while len(self._groups) > ROW_GROUPS_KEPT:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        return values[row - starts[group]].as_py()
