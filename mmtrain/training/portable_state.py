"""The trainable state in a form any process count can load: whole fp32 values, Adam moments, step.

Beside what Accelerate and DeepSpeed write (per rank, partitioned at ZeRO 1-3), every
checkpoint holds ``trainable_state.safetensors``: for each trainable parameter its full
fp32 master value (``param/<name>``) and Adam moments (``exp_avg/<name>``,
``exp_avg_sq/<name>``), and the optimizer's step count in the file's metadata. The
state can be large (12 bytes a trainable parameter: some hundreds of MB for a 7B model
with LoRA, about 80 GB with ``--lm_training full``), so it is never held whole: the file's
header is written from the shapes alone, then each tensor is gathered (a collective
under DeepSpeed, every process taking part), copied to the host by the main process
only, written and let go before the next (:func:`write`). Host memory grows by one
tensor on the main process (the largest is what the memory report counts) and not at
all on the others. Loading reads one tensor at a time from the file, too.

Under DeepSpeed it is gathered and scattered with DeepSpeed's public helpers
(``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and
their ``safe_set_`` twins), which cover ZeRO 1, 2, 3 and the bf16 optimizer (ZeRO 0 with
bf16), optimizer offload included. Where they have nothing to say (no DeepSpeed, or a
DeepSpeed optimizer that keeps no separate master copy) the parameter is its own master
and the optimizer's state for it is whole on every process.

We chose this over DeepSpeed's universal checkpoint. That needs an offline conversion of
the partitioned files (``python -m deepspeed.checkpoint.ds_to_universal``) and a config
switch to load them, covers DeepSpeed runs only (the single-process path writes no
DeepSpeed files), and does not take our checkpoints: run on a ZeRO-2 checkpoint of the
tiny presets written through Accelerate (DeepSpeed 0.19.8), the conversion stops with
"Required universal_checkpoint_info state is missing in checkpoint", a record that
Megatron-style trainers pass to ``save_checkpoint`` themselves and Accelerate's
``save_state`` does not.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass

import torch

from mmtrain.compat import deepspeed as deepspeed_compat
from mmtrain.model.errors import ConfigError
from mmtrain.training import adam_state

PORTABLE_STATE = "trainable_state.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    from accelerate.utils import extract_model_from_parallel

    return [(n, p) for n, p in extract_model_from_parallel(model).named_parameters() if p.requires_grad]


def _deepspeed_helpers(deepspeed: bool):
    """DeepSpeed's full-state getters and setters (its public ``deepspeed.utils``), or None without DeepSpeed."""
    if not deepspeed:
        return None
    from deepspeed import utils

    return utils


@dataclass
class WriteReport:
    """What one process spent writing the portable state (:func:`write`)."""

    tensors: int = 0  # tensors written (0 on the processes that do not write)
    bytes_on_disk: int = 0  # the file's size
    # Most host bytes this process held at once for the file: gathered tensors and copies
    # to the host, not the parameters' or the optimizer's own memory.
    host_peak_bytes: int = 0
    # Why the file could not be written (a full disk, say), None if it was. The writer
    # goes on taking part in the other processes' gathers, so that all stop together.
    error: str | None = None


def write(path: str, model, optimizer, deepspeed: bool, *, writer: bool) -> WriteReport:
    """Stream every trainable parameter's full fp32 value and Adam moments into ``path``, one tensor at a time.

    A collective under DeepSpeed: every process calls it, in the same order, and takes
    part in each tensor's gather; only the ``writer`` (the main process) copies the
    gathered tensor to the host, writes it and lets it go before the next one, so its
    host memory grows by one tensor at most and the others' not at all.
    """
    ds = _deepspeed_helpers(deepspeed)
    if ds is not None:
        deepspeed_compat.link_zero_optimizer_state(optimizer)
    masters = deepspeed_compat.fp32_masters(optimizer)
    params = _trainable(model)
    step = adam_state.adam_step_count(optimizer) or 0
    report = WriteReport()
    out = None
    if writer:
        entries = [(f"{key}/{name}", deepspeed_compat.full_shape(p)) for name, p in params for key in ("param", *MOMENTS)]
        out = StreamedSafetensors(path, entries, {"optimizer_step": str(step)})
    def put(key: str, tensor: torch.Tensor | None, gathered: bool) -> None:
        nonlocal out
        # A tensor DeepSpeed gathered is a new buffer on every process (on the host in a CPU run).
        held = tensor.nbytes if gathered and tensor is not None and tensor.device.type == "cpu" else 0
        try:
            held += _put(out, key, tensor)
        except OSError as e:
            report.error = f"{path}: {e}"
            out.abandon()
            out = None
        report.host_peak_bytes = max(report.host_peak_bytes, held)

    try:
        for name, p in params:
            # Under DeepSpeed each getter is a collective: called on every process, one tensor at a time.
            value = ds.safe_get_full_fp32_param(p) if ds else None
            if value is not None:
                put(f"param/{name}", value, gathered=True)
                del value
                for k in MOMENTS:
                    put(f"{k}/{name}", ds.safe_get_full_optimizer_state(p, k), gathered=True)
            elif out is not None:  # whole on this process: nothing to take part in elsewhere
                value, moments = _local_master(p, optimizer, masters)
                put(f"param/{name}", value, gathered=False)
                for k in MOMENTS:
                    put(f"{k}/{name}", moments[k], gathered=False)
        if out is not None:
            out.close()
            report.tensors, report.bytes_on_disk = len(out.entries), out.size
    except BaseException:
        if out is not None:
            out.abandon()
        raise
    return report


def _put(out: StreamedSafetensors | None, key: str, tensor: torch.Tensor | None) -> int:
    """Write ``tensor`` (None: no optimizer step yet, zeros) as fp32; returns the bytes of the host copy it took."""
    if out is None:
        return 0
    if tensor is None:
        host = torch.zeros(out.shape_of(key), dtype=torch.float32)
        copied = host.nbytes
    else:
        tensor = tensor.detach()
        host = tensor.to("cpu", torch.float32).contiguous()
        # A tensor already in fp32 on the host is written from its own memory.
        copied = 0 if host.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() else host.nbytes
    out.write(key, host)
    return copied


class StreamedSafetensors:
    """One safetensors file written tensor by tensor, in the order of ``entries`` (name, shape; all fp32).

    The format puts a JSON header of every tensor's dtype, shape and byte range before
    the data; all of that is known before any value is, so the header is written first
    and each value's bytes follow as they come, and nothing needs the whole state at once.
    """

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.entries = entries
        header: dict = {"__metadata__": metadata}
        offset = 0
        self._sizes: list[int] = []
        for name, shape in entries:
            size = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append(size)
            offset += size
        self._shapes = dict(entries)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.size = 8 + len(text) + offset
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(text)))
        self._file.write(text)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape = self.entries[self._next]
        if name != expected or tensor.numel() != math.prod(shape) or tensor.dtype != torch.float32:
            raise ValueError(f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected} {shape} float32 next")
        if tensor.numel():
            self._file.write(memoryview(tensor.numpy()).cast("B"))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            raise ValueError(f"{self.path}: {self._next} of {len(self.entries)} tensors written")
        self._file.flush()
        if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):  # not a device such as a benchmark's /dev/null
            os.fsync(self._file.fileno())
        self._file.close()

    def abandon(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class PortableState:
    """A written portable state, read one tensor at a time (``state[key]``, ``state.get(key)``)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt")
        self._keys = set(self._file.keys())
        self.metadata = self._file.metadata() or {}

    def get(self, key: str) -> torch.Tensor | None:
        return self._file.get_tensor(key) if key in self._keys else None

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def numel(self, key: str) -> int | None:
        """Elements of ``key`` as the file's header gives them (nothing read), None if it has no such tensor."""
        return math.prod(self._file.get_slice(key).get_shape()) if key in self._keys else None

    def keys(self) -> set[str]:
        return set(self._keys)


def read(path: str) -> tuple[PortableState, int]:
    state = PortableState(path)
    if "optimizer_step" not in state.metadata:
        raise ConfigError(f"{path}: no optimizer_step in its metadata; it was not written by this trainer")
    return state, int(state.metadata["optimizer_step"])


def load_into(model, optimizer, tensors: PortableState, step: int, deepspeed: bool, source: str) -> None:
    """Write ``tensors`` (from :func:`write`, maybe on another process count) into a freshly prepared engine.

    Sets the fp32 master copies, the compute-dtype weights the forward uses, the Adam
    moments and the step count. A collective under DeepSpeed, like :func:`gather`.
    """
    params = _trainable(model)
    for name, p in params:
        for key in ("param", *MOMENTS):
            numel = tensors.numel(f"{key}/{name}")
            if numel is None:
                raise ConfigError(f"{source}: no {key}/{name}; it holds the trainable state of another model")
            if numel != deepspeed_compat.full_numel(p):
                raise ConfigError(f"{source}: {key}/{name} has {numel} elements, the model's parameter {deepspeed_compat.full_numel(p)}")
    ds = _deepspeed_helpers(deepspeed)
    adam_state.create_adam_state(optimizer, step)
    deepspeed_compat.link_zero_optimizer_state(optimizer)
    masters = deepspeed_compat.fp32_masters(optimizer)
    for name, p in params:
        value = tensors[f"param/{name}"]
        if ds is not None and ds.safe_get_full_fp32_param(p) is not None:
            ds.safe_set_full_fp32_param(p, value.to(torch.float32))
            for k in MOMENTS:
                ds.safe_set_full_optimizer_state(p, tensors[f"{k}/{name}"], k)
        else:
            master, moments = _local_master(p, optimizer, masters)
            master.copy_(value.view_as(master))  # a view: into the parameter itself, or its flat fp32 master
            for k, m in moments.items():
                m.copy_(tensors[f"{k}/{name}"].view_as(m))
        with _whole(p, ds):
            p.data.copy_(value.view(p.shape).to(p.dtype))


def _local_master(p, optimizer, masters) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """``p``'s fp32 master and Adam moments, as views into what the optimizer steps, where each process holds them whole.

    That is: no DeepSpeed (the parameter is its own master), or DeepSpeed at ZeRO 0 with a
    mixed-precision wrapper that keeps masters apart (:func:`mmtrain.compat.deepspeed.fp32_masters`).
    """
    base = deepspeed_compat.base_optimizer(optimizer)
    if id(p) not in masters:
        state = base.state.get(p, {})
        return p.detach(), {k: state.get(k) for k in MOMENTS}
    held, offset = masters[id(p)]
    state = base.state.get(held, {})

    def view(t):
        return None if t is None else t.view(-1).narrow(0, offset, p.numel()).view(p.shape)

    return view(held.detach()), {k: view(state.get(k)) for k in MOMENTS}


def _whole(p, ds):
    """A ZeRO-3 parameter gathered for writing (every rank writes the same value), else as it is."""
    if ds is None or not deepspeed_compat.is_zero3_partitioned(p):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
