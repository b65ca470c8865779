"""Datasets in the shapes ``datasets`` makes: Parquet and Arrow files, ``save_to_disk`` folders, cached Hub names.

:func:`open_dataset` turns one ``--dataset_names`` entry into a memory-mapped
``datasets.Dataset``, read by ``datasets`` itself:

* a ``.parquet`` file: ``load_dataset("parquet")`` (converted once into the ``datasets``
  cache, then memory-mapped);
* an ``.arrow`` file as ``datasets`` writes it: memory-mapped where it lies;
* a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (the
  latter's ``--dataset_split``), or any other folder ``load_dataset`` reads (a Hub
  snapshot's ``data/*.parquet``, say);
* any other name: a Hub dataset as ``load_dataset(name, split=--dataset_split)`` left it
  in the local cache (``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``), read with the
  network off; a name that is not there is an error naming it.

:func:`dataset_records` checks every row (:func:`mmtrain.data.formats.normalize_record`)
without decoding an image; embedded images become references the
:class:`mmtrain.data.images.ImageStore` reads back when a sample is encoded.
"""

from __future__ import annotations

import contextlib
import os

from mmtrain.data.formats import DataError, normalize_record
from mmtrain.data.images import strip_embedded, without_image_bytes

TABLE_SUFFIXES = (".parquet", ".arrow")
# A name ending so is a file that is not there, never a Hub name.
DATA_SUFFIXES = (".json", ".jsonl", *TABLE_SUFFIXES)
# Rows converted to Python at once while checking: their images' bytes are dropped as each batch is read.
CHECK_BATCH = 64


def is_json(name: str) -> bool:
    return os.path.isfile(name) and not name.endswith(TABLE_SUFFIXES)


@contextlib.contextmanager
def _quiet():
    import datasets

    was = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def datasets_cache() -> str | None:
    """The folder ``datasets`` caches Hub datasets in, read from the environment now (None: its default)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.environ["HF_DATASETS_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "datasets")
    return None


def open_dataset(name: str, split: str):
    """``(source name, datasets.Dataset)`` of one ``--dataset_names`` entry that is not a JSON file (see the module docstring)."""
    import datasets

    with _quiet():
        if os.path.isfile(name):
            try:
                if name.endswith(".arrow"):
                    return name, datasets.Dataset.from_file(name)
                return name, datasets.load_dataset("parquet", data_files=name, split="train")
            except Exception as err:  # pyarrow's and datasets' own errors say what is wrong with the file
                raise DataError(f"{name}: cannot read as {name.rsplit('.', 1)[-1]}: {err}") from None
        if os.path.isdir(name):
            if os.path.isfile(os.path.join(name, "state.json")) or os.path.isfile(os.path.join(name, "dataset_dict.json")):
                loaded = datasets.load_from_disk(name)
            else:
                try:
                    loaded = datasets.load_dataset(name)
                except Exception as err:
                    raise DataError(f"--dataset_names {name!r}: a folder that is neither a save_to_disk folder nor data files datasets reads: {err}") from None
            return _split_of(name, loaded, split)
        if name.endswith(DATA_SUFFIXES) or name.startswith(("/", ".", "~")) or name.count("/") > 1:
            raise DataError(f"--dataset_names {name!r}: no such file or folder")
        return _cached_hub_dataset(name, split)


def _split_of(name: str, loaded, split: str):
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return name, loaded
    if split not in loaded:
        raise DataError(f"--dataset_names {name!r} has splits {', '.join(sorted(loaded))}, not {split!r}: pick one with --dataset_split")
    return f"{name} [{split}]", loaded[split]


def _cached_hub_dataset(name: str, split: str):
    import datasets

    from mmtrain.compat.datasets import datasets_offline

    cache = datasets_cache()
    where = cache or "the default datasets cache (HF_DATASETS_CACHE / HF_HOME unset)"
    try:
        with datasets_offline():
            loaded = datasets.load_dataset(name, cache_dir=cache)
    except Exception as err:
        raise DataError(
            f"--dataset_names {name!r} is not a file, a folder or a registered dataset, and no Hub dataset of that name is "
            f"in {where} (read without the network): load it once with datasets.load_dataset({name!r}) where the Hub can be "
            f"reached, or point HF_DATASETS_CACHE at the cache that holds it ({type(err).__name__})"
        ) from None
    return _split_of(name, loaded, split)


def dataset_records(table, source: str, image_folder: str | None, columns: dict | None) -> list[dict]:
    """Every row of ``table`` checked and made canonical, in order; no image is decoded and no image's bytes are kept."""
    if len(table) == 0:
        raise DataError(f"{source}: no records")
    records, index = [], 0
    # Arrow format: each value as stored (an image as its struct), not decoded by its feature.
    for batch in table.with_format("arrow").iter(batch_size=CHECK_BATCH):
        for row in without_image_bytes(batch).to_pylist():
            records.append(normalize_record(strip_embedded(row, source, index), source, index, image_folder, columns))
            index += 1
    return records

