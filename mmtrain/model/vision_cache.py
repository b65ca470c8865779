"""Frozen vision features, computed once per image and reused every epoch.

With the vision encoder frozen (no vision LoRA), an image's features never change, so
they are computed the first time the image is seen and read back afterwards. The
projector still runs every step (it trains); the cache holds what goes *into* it.

Keys are a digest of the image's pixel values, so the cache needs nothing from the
dataset but what is in the batch, and an image changed by augmentation is simply a new
key. :class:`ImageKeyCollator` computes the digests in the DataLoader workers and
ships them as ``image_keys``; a batch without them is digested in
:meth:`VisionFeatureCache.apply`.

Features are stored on the CPU in the encoder's dtype (the compute dtype), either in a
dict (default) or as one file per image under a folder (``--vision_cache_dir``), which
also survives restarts and is shared by the processes of one machine. The folder has
one subfolder per encoder identity (weights, feature layer, CLS, dtype), so features of
a different encoder are never read back.

ZeRO-3: the frozen encoder is outside the engine and is called here outside the
model's forward, so a process that needs no encoding this step gathers nothing and
cannot make its peers wait.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import torch

from mmtrain.batch import BatchCollator

IMAGE_KEYS = "image_keys"


def image_key(pixels: torch.Tensor) -> str:
    """Digest of one image's pixel values (its dtype and shape included)."""
    pixels = pixels.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{pixels.dtype}{tuple(pixels.shape)}".encode())
    digest.update(pixels.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_keys(pixel_values: torch.Tensor) -> list[str]:
    return [image_key(p) for p in pixel_values]


class ImageKeyCollator(BatchCollator):
    """Wrap a collator to add ``image_keys`` (one digest per image of ``pixel_values``)."""

    def __init__(self, collator: BatchCollator):
        self.collator = collator
        self.output_keys = tuple(collator.output_keys) + (IMAGE_KEYS,)

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collator(items)
        batch[IMAGE_KEYS] = image_keys(batch["pixel_values"])
        return batch


class VisionFeatureCache:
    """``apply(batch)`` swaps ``pixel_values`` for ``image_features``, encoding only unseen images.

    ``encode`` maps ``[n, 3, H, W]`` pixels to ``[n, patches, width]`` features (the
    model's ``encode_images``); ``identity`` names the encoder for the on-disk folder.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], *, directory: str | None = None, identity: dict | None = None):
        self.encode = encode
        self.memory: dict[str, torch.Tensor] = {}
        self.directory = None
        if directory is not None:
            tag = hashlib.blake2b(json.dumps(identity or {}, sort_keys=True).encode(), digest_size=8).hexdigest()
            self.directory = os.path.join(directory, tag)
            os.makedirs(self.directory, exist_ok=True)
            with open(os.path.join(self.directory, "encoder.json"), "w") as f:
                json.dump(identity or {}, f, indent=2, sort_keys=True)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        if self.directory is None:
            return len(self.memory)
        return sum(1 for name in os.listdir(self.directory) if name.endswith(".pt"))

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.pt")

    def _get(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return self.memory.get(key)
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def _put(self, key: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu").clone()
        if self.directory is None:
            self.memory[key] = features
            return
        # Written under a temporary name and renamed: a reader never sees half a file.
        tmp = f"{self._path(key)}.{os.getpid()}.tmp"
        torch.save(features, tmp)
        os.replace(tmp, self._path(key))

    def features(self, pixel_values: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """Features of every image, on ``pixel_values``' device; unseen images are encoded in one call."""
        if keys is None:
            keys = image_keys(pixel_values)
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {pixel_values.shape[0]} images")
        found = {key: self._get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, value in found.items() if value is None]
        if missing or not keys:
            first = {key: i for i, key in reversed(list(enumerate(keys)))}
            rows = [first[key] for key in missing]
            encoded = self.encode(pixel_values[rows])  # the empty batch too: it yields the feature shape
            for key, value in zip(missing, encoded):
                self._put(key, value)
                found[key] = value.detach().to("cpu")
            if not keys:
                return encoded
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([found[key] for key in keys]).to(pixel_values.device, non_blocking=True)

    def apply(self, batch: dict) -> dict:
        """The batch with ``image_features`` in place of ``pixel_values`` (and no ``image_keys``)."""
        batch = dict(batch)
        keys = batch.pop(IMAGE_KEYS, None)
        pixel_values = batch.pop("pixel_values")
        batch["image_features"] = self.features(pixel_values, keys)
        return batch
