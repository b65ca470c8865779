"""Image tar shards in the WebDataset layout: each sample's record and images side by side in one ``.tar``.

A sample is the run of consecutive members that share a key (the member name up to the
first dot of its base name): ``key.json`` holds the record (LLaVA or messages format)
and ``key.jpg`` / ``key.png`` / ``key.0.jpg``, ``key.1.jpg``... its images, in member
order. They replace whatever image names the record gives, and no image folder is read.

The shards are read here with :mod:`tarfile` rather than with the ``webdataset``
package or ``datasets``' webdataset builder: both hand each sample over with its
image's bytes (or the decoded image), and samples waiting in the shuffle buffer go into
every checkpoint as JSON, so a buffer of a thousand images would be written with each
one. What waits in the buffer instead is where each image's bytes lie in its tar
(:func:`member_ref`); they are read from there only when the sample is encoded, so the
saved position stays small and exact, and the shards go through the same ``datasets``
stream (per-process parts, position) as JSONL ones. A tar cut short (a copy interrupted, say)
is reported with its shard, the sample it stopped after and the byte offset.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile


def tar_member_data_offset(member) -> int:
    """Where a tar member's bytes start in its archive (``TarInfo.offset_data``).

    A streamed tar shard's buffer keeps where each image lies instead of its bytes, so
    that a checkpoint of the buffer stays small. ``tarfile`` sets the attribute when it
    reads a header, but it is not among the documented ones; ``tests/test_compat.py``
    reads an image back through it.
    """
    return member.offset_data


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_REF = re.compile(r"^(?P<tar>.+\.tar):(?P<offset>\d+):(?P<size>\d+)$")


def member_ref(tar_path: str, offset: int, size: int) -> str:
    """An image path naming ``size`` bytes at ``offset`` of ``tar_path`` (absolute, so no image folder is joined to it)."""
    return f"{os.path.abspath(tar_path)}:{offset}:{size}"


def open_member(path: str) -> io.BytesIO | None:
    """The bytes a :func:`member_ref` names, or None for an ordinary file path."""
    match = _REF.match(path)
    if match is None or os.path.isfile(path):
        return None
    with open(match["tar"], "rb") as f:
        f.seek(int(match["offset"]))
        return io.BytesIO(f.read(int(match["size"])))


def _split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member: ``a/b.0.jpg`` -> ``("a/b", ".0.jpg")``."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot + rest


def read_tar(path: str):
    """Every sample of one tar shard as a raw stream row (record text, image refs), in member order.

    A damaged or truncated archive ends the shard with a row whose ``error`` says where.
    """
    index, key, record, images, offset = 0, None, None, [], 0
    end = 0  # where the archive's end-of-archive blocks must start: after the last member's data

    def row():
        return {"source": path, "index": index, "offset": offset, "line": record or "", "images": json.dumps(images), "error": ""}

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                data = tar_member_data_offset(member)
                end = data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not member.isfile():
                    continue
                member_key, extension = _split_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield row()
                        index += 1
                    key, record, images, offset = member_key, None, [], member.offset
                if extension == ".json":
                    record = tar.extractfile(member).read().decode("utf-8", errors="replace")
                elif extension.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(member_ref(path, data, member.size))
        # tarfile takes a header cut short for the archive's end; a whole archive has zero
        # blocks there, so anything else is a truncation (and the last sample may be cut).
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(tarfile.BLOCKSIZE)
        if len(tail) < tarfile.BLOCKSIZE or tail.count(0) != tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"the archive ends at byte {end} without its end-of-archive blocks")
        if key is not None:
            yield row()
    except (tarfile.TarError, EOFError, OSError) as err:
        where = f"after sample {index - 1}" if index else "before its first sample"
        yield {"source": path, "index": index, "offset": offset, "line": "", "images": "[]",
               "error": f"{path}: tar shard is truncated or damaged {where} (byte {offset}): {err}"}
