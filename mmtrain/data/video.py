"""Videos on the data side: which frames are sampled, how many (read up front), and decoding them.

A record's video is a clip file (``"clip.mp4"``) or a list of frame images; in a
canonical record it is one string, the path, or the frame paths as a JSON list
(:func:`frame_list`), so the Arrow table keeps one string column.

Frames are sampled uniformly, ``--max_frames`` of them spread over the video (all of a
shorter one), or at ``--video_fps`` from a clip and then thinned uniformly to
``--max_frames``. How many frames a video gives is read before training from the clip's
container metadata (frame count and rate; the packets are counted, not decoded, where a
container states no count), so token budgets are exact; a clip that then decodes to
fewer frames than its metadata stated is a bad sample naming its file and record.

Clips are decoded with PyAV (the ``video`` extra: ``pip install mmtrain[video]``), the
FFmpeg binding transformers' own video utilities use; torchvision's video reader is
deprecated, and torchvision is no dependency. Frame lists need no decoder.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from mmtrain.data.formats import BadImageError, DataError


class BadVideoError(BadImageError):
    """A video file (or one of its frames) that is missing or cannot be decoded; counted as a bad sample."""


def frame_list(video: str) -> list[str] | None:
    """The frame paths of a video given as a list of frame images, or None for a clip file."""
    return json.loads(video) if video.startswith("[") else None


def video_files(video: str) -> list[str]:
    """The files a video reads: its clip, or its frames."""
    frames = frame_list(video)
    return [video] if frames is None else frames


def describe_video(video: str) -> str:
    frames = frame_list(video)
    return f"video file {video}" if frames is None else f"video of {len(frames)} frame images (first {frames[0]})"


def sample_indices(total: int, max_frames: int, fps: float = 0.0, native_fps: float | None = None) -> list[int]:
    """Indices of the frames taken from a video of ``total`` frames (at ``native_fps``, where known).

    ``fps`` > 0: one frame every ``native_fps / fps`` (every frame when the video has fewer
    per second); then, as with ``fps`` 0, at most ``max_frames`` spread uniformly, first
    and last included.
    """
    picked = list(range(total))
    if fps > 0 and native_fps and native_fps > fps:
        step = native_fps / fps
        picked = sorted({int(k * step) for k in range(int(np.ceil(total / step)))} & set(picked))
    if len(picked) > max_frames:
        picked = [picked[int(k)] for k in np.linspace(0, len(picked) - 1, max_frames).round()]
    return picked


def _require_av(what: str):
    try:
        import av
    except ImportError:  # a setup to fix, not a bad sample to skip
        raise DataError(f"{what}: reading video files needs PyAV (pip install 'mmtrain[video]', or pip install av)") from None
    return av


def clip_metadata(path: str, where: str) -> tuple[int, float | None]:
    """``(frames, frames per second)`` of a clip's first video stream, from its container (no frame decoded)."""
    what = f"{where}: video file {path}"
    av = _require_av(what)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadVideoError(f"{what} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            total = int(stream.frames or 0)
            if total == 0:  # the container states no count: count the packets (no decoding)
                total = sum(1 for packet in container.demux(stream) if packet.size)
    except FileNotFoundError:
        raise BadVideoError(f"{what} not found") from None
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise BadVideoError(f"{what} cannot be decoded: {err}") from None
    if total == 0:
        raise BadVideoError(f"{what} has no frames")
    return total, rate


def sampled_frame_count(video: str, where: str, max_frames: int, fps: float = 0.0) -> int:
    """How many frames ``video`` gives under ``--max_frames``/``--video_fps``, read without decoding any frame."""
    frames = frame_list(video)
    if frames is not None:
        return len(sample_indices(len(frames), max_frames))
    total, rate = clip_metadata(video, where)
    return len(sample_indices(total, max_frames, fps, rate))


def decode_clip(path: str, where: str, max_frames: int, fps: float = 0.0) -> list[Image.Image]:
    """The sampled frames of a clip file, decoded in one pass (RGB)."""
    what = f"{where}: video file {path}"
    total, rate = clip_metadata(path, where)
    wanted = sample_indices(total, max_frames, fps, rate)
    av = _require_av(what)
    frames: list[Image.Image] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            keep = set(wanted)
            for k, frame in enumerate(container.decode(stream)):
                if k in keep:
                    frames.append(frame.to_image().convert("RGB"))
                if k >= wanted[-1]:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise BadVideoError(f"{what} cannot be decoded: {err}") from None
    if len(frames) != len(wanted):
        raise BadVideoError(f"{what} decodes to fewer frames than the {total} its container states (frame {wanted[len(frames)]} is missing)")
    return frames
