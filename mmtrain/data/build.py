"""From data flags to train and eval datasets: registry, selection, split, length policy.

The trainer makes two calls. :func:`read_sources`, before any weights load:

1. resolve ``--dataset_names``: JSON/JSONL files, registered names such as
   ``synthetic``, or what ``datasets`` reads (Parquet and Arrow files, ``save_to_disk``
   folders, Hub names in the local cache: :mod:`mmtrain.data.hub`);
2. load and check every record of every source (no image is opened; embedded images
   stay in their memory-mapped tables, which the datasets read them back from);
3. take ``--dataset_samples`` from each file (a seeded subset) and split off eval
   (``--eval_ratio`` per file, seeded, or the ``--eval_dataset_names`` files);
4. check that every image (and video) file of the records taken exists (one ``stat``
   each, many at once): under ``--on_bad_sample error`` a missing one stops the run here,
   naming the first ones with their file and record; under ``skip`` their records are
   dropped and counted. An image that exists but does not decode is still found when it
   is read; a video clip is opened here to read its frame count (container metadata,
   no frame decoded), so one that cannot be read, or whose frames alone exceed
   ``--max_images_per_batch``, stops the run here naming its file and record.
   With ``--streaming`` the training globs are only expanded here (no shard is read), and
   only the eval files go through these steps.

Then :func:`build_datasets`, once the tokenizer exists:

5. tokenise the text once to measure each sample (image spans have a known length)
   and apply ``--overlength_policy``;
6. wrap the survivors in :class:`ConversationDataset` (train concatenated, eval not).
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mmtrain.data.dataset import BadImageError, ConversationDataset, Entry, image_size, split_turns
from mmtrain.data.formats import DataError, load_records
from mmtrain.data.hub import dataset_records, is_json, open_dataset
from mmtrain.data.images import ImageStore, parse_embedded
from mmtrain.data.preference import PreferenceDataset, fit_pair
from mmtrain.data.streaming import ShardStream, shard_files
from mmtrain.data.synthetic import generate_synthetic, generate_synthetic_pairs
from mmtrain.data.template import check_template, encode_conversation
from mmtrain.data.video import BadVideoError, describe_video, sampled_frame_count, video_files
from mmtrain.image_tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

# name -> function(data_args, seed) returning the path of a JSON file, or a datasets.Dataset.
DATASET_REGISTRY: dict[str, Callable] = {}


def register_dataset(name: str, build: Callable) -> None:
    """Make ``name`` usable in ``--dataset_names``; ``build(data_args, seed)`` returns a JSON path or a ``datasets.Dataset``."""
    DATASET_REGISTRY[name] = build


def _synthetic(data_args, seed: int) -> str:
    n = data_args.synthetic_num_samples
    return generate_synthetic(os.path.join(data_args.data_path, f"synthetic-seed{seed}-n{n}"), n, seed)


def _synthetic_pairs(data_args, seed: int) -> str:
    n = data_args.synthetic_num_samples
    return generate_synthetic_pairs(os.path.join(data_args.data_path, f"synthetic-pairs-seed{seed}-n{n}"), n, seed)


register_dataset("synthetic", _synthetic)
register_dataset("synthetic_pairs", _synthetic_pairs)


def resolve_dataset(name: str, data_args, seed: int):
    """A registered name's generated file or ``datasets.Dataset``, or ``name`` itself (a path or a Hub name)."""
    if name in DATASET_REGISTRY:
        return DATASET_REGISTRY[name](data_args, seed)
    return name


def load_source(resolved, name: str, folder: str | None, data_args, tables: dict) -> tuple[str, list[dict]]:
    """``(source name, canonical records)`` of one resolved dataset; a ``datasets`` table is kept in ``tables`` for its images."""
    columns = data_args.column_map()
    if isinstance(resolved, str) and is_json(resolved):
        return resolved, load_records(resolved, folder, columns)
    if isinstance(resolved, str):
        source, table = open_dataset(resolved, data_args.dataset_split)
        if folder is None and os.path.exists(resolved):  # relative image paths: beside the file, or in the folder
            folder = resolved if os.path.isdir(resolved) else os.path.dirname(os.path.abspath(resolved))
    else:
        source, table = name, resolved
    tables[source] = table
    return source, dataset_records(table, source, folder, columns)


def _main_process_first(main_process_first):
    """Accept ``accelerator.main_process_first`` (callable), its context manager, or None."""
    if main_process_first is None:
        return contextlib.nullcontext()
    return main_process_first() if callable(main_process_first) else main_process_first


@dataclass
class DataBundle:
    """What :func:`build_datasets` returns: the datasets, a report, and generation prompts."""

    train: ConversationDataset
    eval: ConversationDataset
    static_report: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def report(self) -> dict:
        """Counts for the log; ``skipped_bad_samples`` is read live (it grows while training)."""
        report = dict(self.static_report)
        report["skipped_bad_samples"] = self.train.skipped_bad_samples + self.eval.skipped_bad_samples
        return report

    def generation_examples(self, n: int) -> list[dict]:
        """Up to ``n`` eval examples as prompts with reference answers, the same ones every call.

        Each is ``{"input_ids": prompt ids ending with the answer cue, "pixel_values":
        [k, 3, H, W], "answer": str}``; examples with a bad image are passed over.
        """
        order = np.random.default_rng([self.seed, 7]).permutation(len(self.eval.entries))
        examples = []
        for e in order:
            if len(examples) >= n:
                break
            try:
                examples.append(self.eval.generation_example(int(e)))
            except BadImageError:
                continue
        return examples


def _select(n: int, spec: str, seed: int, source_index: int) -> tuple[np.ndarray, int]:
    """Rows taken from a file of ``n`` records: all, or a seeded subset in file order."""
    if spec == "all":
        return np.arange(n), n
    wanted = int(spec)
    rows = np.random.default_rng([seed, source_index]).permutation(n)[: min(wanted, n)]
    return np.sort(rows), wanted


def _split(rows: np.ndarray, ratio: float, seed: int, source_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows): a seeded ``ratio`` of each file is held out (at least one row)."""
    if ratio <= 0 or len(rows) < 2:
        return rows, rows[:0]
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * ratio)))
    shuffled = np.random.default_rng([seed, source_index, 1]).permutation(len(rows))
    return np.sort(rows[shuffled[n_eval:]]), np.sort(rows[shuffled[:n_eval]])


def _fit(
    records: list[dict], data_args, tokenizer, image_tokens, counts: dict, split: str, pairs: bool = False, store: ImageStore | None = None,
    share_prompt: bool = False,
) -> tuple[list[dict], list[Entry]]:
    """Measure each record and apply the over-length policy; returns kept records and entries."""
    kept, entries = [], []
    fit = _record_fitter(pairs, share_prompt)
    for record in records:
        try:
            sizes = record_image_sizes(record, image_tokens, store)
        except BadImageError:
            if data_args.on_bad_sample != "skip":
                raise
            counts[f"dropped_bad_image_{split}"] += 1
            continue
        entry = fit(record, data_args, tokenizer, image_tokens, counts, split, row=len(kept), image_sizes=sizes)
        if entry is not None and record.get("videos"):
            frames = join_video_frames(record, entry.keep_pairs)
            counts[f"videos_{split}"] += len(frames)
            counts[f"frames_{split}"] += sum(frames)
        if entry is not None:
            entries.append(entry)
            kept.append(record)
    return kept, entries


def _record_fitter(pairs: bool, share_prompt: bool):
    """What measures a record and applies the over-length policy: :func:`fit_pair` for preference pairs, else :func:`fit_record`."""
    return functools.partial(fit_pair, share_prompt=share_prompt) if pairs else fit_record


def record_image_sizes(record: dict, image_tokens, store: ImageStore | None = None) -> list[tuple[int, int]] | None:
    """Each image's ``(height, width)``, read from its header, where tiles make an image's tokens follow its size (else None)."""
    if image_tokens.sized is None:
        return None
    return [image_size(path, record["source"], record["index"], store) for path in record["images"]]


def record_video_frames(record: dict, data_args) -> list[int]:
    """Each video's sampled frame count: as :func:`read_sources` recorded it, else read now (a streamed record)."""
    if "video_frames" not in record:
        where = f"{record['source']}: record {record['index']}"
        record["video_frames"] = [sampled_frame_count(v, where, data_args.max_frames, data_args.video_fps) for v in record.get("videos") or []]
    return list(record["video_frames"])


def join_video_frames(record: dict, keep_pairs: int) -> list[int]:
    """Frame counts of the videos the first ``keep_pairs`` question/answer pairs of ``record`` use."""
    _, body = split_turns(record["turns"])
    used = sum(t["text"].count(VIDEO_PLACEHOLDER) for t in body[: 2 * keep_pairs])
    return list(record.get("video_frames") or [])[:used]


def fit_record(
    record: dict, data_args, tokenizer, image_tokens, counts: dict, split: str, row: int = 0, image_sizes=None,
) -> Entry | None:
    """Measure one record and apply the over-length policy: its entry, or None when it is dropped (counted).

    A sample is over-long when it has more tokens than :meth:`DataArguments.longest_sample`
    (``--max_seq_len``, or a smaller ``--max_tokens_per_batch``) or, under an image budget,
    more images than ``--max_images_per_batch``: a micro-batch could never hold it; or
    more image tokens than ``--max_image_tokens``. Each video frame is one image under the
    image budget (one encoder input), and its tokens are counted.
    """
    limit = data_args.longest_sample()
    image_limit = data_args.max_images_per_batch
    video_frames = record_video_frames(record, data_args)
    if video_frames and image_tokens.video_id is None:
        raise DataError(
            f"{record['source']}: record {record['index']} has a video, and this model reads none: set --video_pool "
            "(1: frames unpooled; 2: LLaVA-NeXT-Video's 2x2 pooling)"
        )
    encoded = encode_conversation(
        record["turns"], tokenizer, image_tokens, template=data_args.template, system_prompt=data_args.system_prompt,
        image_sizes=image_sizes, video_frames=video_frames,
    )
    _, body = split_turns(record["turns"])
    images_after = _images_after_each_pair(body, video_frames)
    pairs = len(encoded.turn_ends)
    keep = pairs
    too_many_images = image_limit is not None and images_after and images_after[-1] > image_limit
    token_limit = getattr(data_args, "max_image_tokens", None)
    image_tokens_after = _image_tokens_after(encoded, image_tokens.image_id) if token_limit is not None else [0] * pairs
    too_many_image_tokens = token_limit is not None and image_tokens_after and image_tokens_after[-1] > token_limit
    if len(encoded.input_ids) > limit or too_many_images or too_many_image_tokens:
        if data_args.overlength_policy == "truncate_turns":
            keep = sum(
                1 for end, images, spans in zip(encoded.turn_ends, images_after, image_tokens_after)
                if end <= limit and (image_limit is None or images <= image_limit) and (token_limit is None or spans <= token_limit)
            )
        else:
            keep = 0
        if keep == 0:
            counts[f"dropped_overlength_{split}"] += 1
            return None
        counts[f"truncated_{split}"] += 1
    length = encoded.turn_ends[keep - 1] if keep < pairs else len(encoded.input_ids)
    num_images = sum(t["text"].count(IMAGE_PLACEHOLDER) for t in body[: 2 * keep])
    encoder_inputs = images_after[keep - 1]  # images and video frames
    counts[f"text_only_{split}"] += encoder_inputs == 0
    counts[f"images_{split}"] += num_images
    counts[f"tokens_{split}"] += length
    counts[f"longest_sample_{split}"] = max(counts[f"longest_sample_{split}"], length)
    return Entry(row, keep, length, encoder_inputs, encoded.prefix_length)


def _image_tokens_after(encoded, image_id: int) -> list[int]:
    """Image tokens up to the end of each question/answer pair of an encoded conversation."""
    ids, totals, seen, start = encoded.input_ids, [], 0, 0
    for end in encoded.turn_ends:
        seen += sum(1 for t in ids[start:end] if t == image_id)
        totals.append(seen)
        start = end
    return totals


def _images_after_each_pair(body: list[dict], video_frames: list[int] = ()) -> list[int]:
    """Encoder inputs (images, and each video's frames) used up to the end of each question/answer pair of a conversation's turns."""
    totals, seen, videos = [], 0, 0
    for i, turn in enumerate(body):
        seen += turn["text"].count(IMAGE_PLACEHOLDER)
        used = turn["text"].count(VIDEO_PLACEHOLDER)
        seen += sum(video_frames[videos : videos + used])
        videos += used
        if i % 2 == 1:
            totals.append(seen)
    return totals


def _table(records: list[dict]):
    import datasets

    if not records:
        return []
    return datasets.Dataset.from_list(records)


@dataclass
class Sources:
    """The records training and eval take, read and checked by :func:`read_sources` (no tokenizer needed)."""

    train: list[dict]
    eval: list[dict]
    report: dict  # per file: records, selected, requested, train, eval; and the missing-image counts
    shards: list[tuple[str, str | None]] = field(default_factory=list)  # --streaming: (shard file, image folder), none read
    images: ImageStore = field(default_factory=ImageStore)  # where the embedded images of these records are read back


# Records whose images are looked up at once; a stat is I/O-bound, so threads overlap
# the waits (network file systems answer in milliseconds, local disks in microseconds).
STAT_THREADS = 32
MISSING_NAMED = 5  # missing files named in the error; the count covers them all


def _missing_images(records: list[tuple[str, int, dict]]) -> list[tuple[str, int, str]]:
    """(data file, record number, image path) of every image file that does not exist, in record order."""
    def files(record: dict) -> list[str]:
        return [p for p in record["images"] if parse_embedded(p) is None] + [f for v in record.get("videos") or [] for f in video_files(v)]

    paths = sorted({p for _, _, r in records for p in files(r)})
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(STAT_THREADS, len(paths))) as pool:
        exists = dict(zip(paths, pool.map(os.path.isfile, paths)))
    return [(source, index, p) for source, index, r in records for p in files(r) if not exists.get(p, True)]


def _check_images(taken: list[tuple[str, int, dict]], on_bad_sample: str, counts: dict) -> set[int]:
    """Positions in ``taken`` whose records name a missing image (``skip``), or a DataError (``error``)."""
    missing = _missing_images(taken)
    if not missing:
        return set()
    records = sorted({(source, index) for source, index, _ in missing})
    if on_bad_sample == "error":
        videos = {f for _, _, r in taken for v in r.get("videos") or [] for f in video_files(v)}
        kind = "image or video" if any(path in videos for _, _, path in missing) else "image"
        named = "; ".join(f"{source} record {index}: {path}" for source, index, path in missing[:MISSING_NAMED])
        more = f" (and {len(missing) - MISSING_NAMED} more)" if len(missing) > MISSING_NAMED else ""
        raise DataError(
            f"{len(records)} record(s) name {kind} files that do not exist ({len({p for _, _, p in missing})} file(s)): {named}{more}. "
            "Fix the paths (relative ones are resolved against --image_folder, else the data file's folder), "
            "or pass --on_bad_sample skip to leave those records out"
        )
    bad = set(records)
    counts["missing_image_records"] = len(records)
    counts["missing_image_files"] = len({path for _, _, path in missing})
    return {i for i, (source, index, _) in enumerate(taken) if (source, index) in bad}


def _measure_videos(taken: list[tuple[str, int, dict]], data_args, counts: dict, passed_over: set[int] = frozenset()) -> set[int]:
    """Record each video's sampled frame count (``record["video_frames"]``, every record given one) from its container.

    A clip that cannot be read is an error naming its file and record (``skip``: its
    record's position is returned and counted); so is a video whose frames alone exceed
    ``--max_images_per_batch``, which no micro-batch could hold. ``passed_over``: positions
    already dropped (a missing file).
    """
    bad = set()
    for i, (source, index, record) in enumerate(taken):
        if i in passed_over:
            continue
        where = f"{source}: record {index}"
        try:
            record["video_frames"] = [sampled_frame_count(v, where, data_args.max_frames, data_args.video_fps) for v in record.get("videos") or []]
        except BadVideoError:
            if data_args.on_bad_sample != "skip":
                raise
            bad.add(i)
            counts["bad_video_records"] += 1
            continue
        limit = data_args.max_images_per_batch
        for video, frames in zip(record.get("videos") or [], record["video_frames"]):
            if limit is not None and frames > limit:
                raise DataError(
                    f"{where}: {describe_video(video)} gives {frames} frames, more than --max_images_per_batch {limit} "
                    "(each frame is one encoder input): lower --max_frames or raise the budget"
                )
    return bad


def check_videos_read(sources: Sources, reads_videos: bool) -> None:
    """A record with a video for a model that reads none (``--video_pool 0``) is an error naming it, before any weights load."""
    if reads_videos:
        return
    for record in sources.train + sources.eval:
        if record.get("videos"):
            raise DataError(
                f"{record['source']}: record {record['index']} has a video, and the model reads none: set --video_pool "
                "(1: frames unpooled; 2: LLaVA-NeXT-Video's 2x2 pooling)"
            )


def check_record_kind(records: list[dict], pairs: bool) -> None:
    """Preference pairs for ``--objective dpo``, conversations otherwise: the first record of the wrong kind is an error naming it."""
    for record in records:
        if pairs and record.get("videos"):
            raise DataError(f"{record['source']}: record {record['index']} has a video; preference pairs (--objective dpo) take images only")
        if pairs and "rejected" not in record:
            raise DataError(
                f"{record['source']}: record {record['index']} is a conversation, not a preference pair: --objective dpo "
                "needs 'chosen' and 'rejected' answers in every record"
            )
        if not pairs and "rejected" in record:
            raise DataError(
                f"{record['source']}: record {record['index']} is a preference pair ('chosen'/'rejected'): train pairs with --objective dpo"
            )


def read_sources(data_args, seed: int = 42, main_process_first=None, pairs: bool = False) -> Sources:
    """Steps 1-4 of the module docstring: every record read and checked, every image file looked up.

    ``main_process_first`` (e.g. ``accelerator.main_process_first``) lets one process
    generate registered datasets while the others wait. ``pairs``: every record must be a
    preference pair (``--objective dpo``), else none may be. Problems raise :class:`DataError`.
    """
    shards = shard_files(data_args.dataset_names, data_args.image_folder) if data_args.streaming else []
    with _main_process_first(main_process_first):
        paths = [] if data_args.streaming else [resolve_dataset(name, data_args, seed) for name in data_args.dataset_names]
        eval_paths = [resolve_dataset(name, data_args, seed) for name in data_args.eval_dataset_names]

    folders = list(data_args.image_folder)
    sources: dict[str, dict] = {}
    tables: dict = {}
    train_taken, eval_taken = [], []  # (data file, record number, record)
    for i, resolved in enumerate(paths):
        folder = folders[0] if len(folders) == 1 else (folders[i] if folders else None)
        path, records = load_source(resolved, data_args.dataset_names[i], folder, data_args, tables)
        check_record_kind(records, pairs)
        spec = data_args.dataset_samples[0] if len(data_args.dataset_samples) == 1 else data_args.dataset_samples[i]
        rows, wanted = _select(len(records), spec, seed, i)
        train_rows, eval_rows = _split(rows, 0.0 if eval_paths else data_args.eval_ratio, seed, i)
        info = sources.setdefault(path, {"records": 0, "selected": 0, "train": 0, "eval": 0})
        info["records"] += len(records)
        info["selected"] += len(rows)
        info["requested"] = info.get("requested", 0) + wanted
        info["train"] += len(train_rows)
        info["eval"] += len(eval_rows)
        train_taken += [(path, int(r), records[r]) for r in train_rows]
        eval_taken += [(path, int(r), records[r]) for r in eval_rows]
    for name, resolved in zip(data_args.eval_dataset_names, eval_paths):
        folder = folders[0] if len(folders) == 1 else None
        path, records = load_source(resolved, name, folder, data_args, tables)
        check_record_kind(records, pairs)
        info = sources.setdefault(path, {"records": 0, "selected": 0, "train": 0, "eval": 0})
        info["records"] += len(records)
        info["selected"] += len(records)
        info["eval"] += len(records)
        eval_taken += [(path, i, r) for i, r in enumerate(records)]

    counts = {"missing_image_records": 0, "missing_image_files": 0, "bad_video_records": 0}
    bad = _check_images(train_taken + eval_taken, data_args.on_bad_sample, counts)
    bad |= _measure_videos(train_taken + eval_taken, data_args, counts, passed_over=bad)
    train = [r for i, (_, _, r) in enumerate(train_taken) if i not in bad]
    evaluation = [r for i, (_, _, r) in enumerate(eval_taken, start=len(train_taken)) if i not in bad]
    report = {"sources": sources, **counts}
    if shards:
        report["shards"] = len(shards)
    return Sources(train=train, eval=evaluation, report=report, shards=shards, images=ImageStore(tables))


def _shard_stream(
    shards, encoder: ConversationDataset, data_args, tokenizer, image_tokens, counts, seed, rank, world_size, pairs: bool = False,
    share_prompt: bool = False,
) -> ShardStream:
    """The ``--streaming`` training set: each record measured and encoded as it arrives, as a table's would be
    (``pairs``: each must be a preference pair, fitted and encoded as one)."""
    fit = _record_fitter(pairs, share_prompt)

    def encode(record: dict) -> dict | None:
        check_record_kind([record], pairs)
        entry = fit(record, data_args, tokenizer, image_tokens, counts, "train", image_sizes=record_image_sizes(record, image_tokens, encoder.image_store))
        return None if entry is None else encoder.record_item(record, entry)

    return ShardStream(
        shards, encode, rank=rank, world_size=world_size, seed=seed, buffer_size=data_args.shuffle_buffer_size,
        on_bad_sample=data_args.on_bad_sample, columns=data_args.column_map(),
    )


def build_datasets(
    data_args, tokenizer, image_processor, image_tokens, seed: int = 42, main_process_first=None, sources: Sources | None = None,
    rank: int = 0, world_size: int = 1, pairs: bool = False, share_prompt: bool = False,
) -> DataBundle:
    """Build train and eval datasets from ``data_args`` (see the module docstring).

    ``sources``: what :func:`read_sources` returned for these flags (the trainer reads
    them before the model loads); read here when not given. ``tokenizer`` must already
    hold the image tokens (``add_image_tokens``), and ``image_tokens`` is what that call
    returned. Structural problems raise :class:`DataError` here, before training. With
    ``--streaming`` the training set is a :class:`ShardStream` of process ``rank`` of
    ``world_size``, whose records are checked as they are read. ``pairs``: the records
    are preference pairs, and both datasets :class:`PreferenceDataset`; ``share_prompt``: their
    batches hold each pair's prompt once (``--dpo_share_prompt``), which a token budget counts.
    """
    try:
        check_template(tokenizer, data_args.template)
    except ValueError as err:
        raise DataError(str(err)) from None
    if sources is None:
        sources = read_sources(data_args, seed, main_process_first, pairs=pairs)
    counts = {
        f"{key}_{split}": 0
        for key in ("dropped_overlength", "dropped_bad_image", "truncated", "text_only", "images", "videos", "frames", "tokens", "longest_sample")
        for split in ("train", "eval")
    }
    train_records, train_entries = _fit(sources.train, data_args, tokenizer, image_tokens, counts, "train", pairs, sources.images, share_prompt)
    eval_records, eval_entries = _fit(sources.eval, data_args, tokenizer, image_tokens, counts, "eval", pairs, sources.images, share_prompt)
    if not train_entries and not data_args.streaming:
        raise DataError(
            f"no training samples left (dropped as longer than {data_args.longest_sample()} tokens, --max_seq_len or "
            f"--max_tokens_per_batch, or with more images than --max_images_per_batch: {counts['dropped_overlength_train']})"
        )

    common = dict(
        template=data_args.template,
        system_prompt=data_args.system_prompt,
        max_seq_len=data_args.longest_sample(),
        on_bad_sample=data_args.on_bad_sample,
        max_images=data_args.most_images(),
        seed=seed,
        image_store=sources.images,
        max_frames=data_args.max_frames,
        video_fps=data_args.video_fps,
    )
    kind = PreferenceDataset if pairs else ConversationDataset
    train = kind(
        _table(train_records), train_entries, tokenizer, image_tokens, image_processor,
        concatenate=data_args.dataset_concatenate_samples, **common,
    )
    evaluation = kind(_table(eval_records), eval_entries, tokenizer, image_tokens, image_processor, **common)

    report = {
        **sources.report,
        "train_samples": len(train_entries),
        "eval_samples": len(eval_entries),
        "train_items_per_epoch": len(train),
        **counts,
        "mean_length_train": counts["tokens_train"] / max(1, len(train_entries)),
        "template": data_args.template,
        "max_seq_len": data_args.max_seq_len,
        "longest_sample_kept": data_args.longest_sample(),
        "overlength_policy": data_args.overlength_policy,
        "concatenate_samples": data_args.dataset_concatenate_samples,
    }
    if data_args.streaming:
        # Counts of the stream's records grow as they are read; the report says what was known at the start.
        train = _shard_stream(sources.shards, train, data_args, tokenizer, image_tokens, counts, seed, rank, world_size, pairs, share_prompt)
        report["train_items_per_epoch"] = "streamed"
    return DataBundle(train=train, eval=evaluation, static_report=report, seed=seed)
