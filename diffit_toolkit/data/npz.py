"""``.npz`` image arrays in ADM's layout: ``arr_0`` uint8 (N, H, W, C) images, optional ``arr_1`` labels."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.data.transforms import match_channels, to_model_range

#: Accepted (images, labels) key pairs, tried in order.
NPZ_KEYS = (("arr_0", "arr_1"), ("images", "labels"))
#: Most classes a label array may imply (labels are 0..K-1; a stray 2**40 would size the model).
MAX_CLASSES = 1_000_000
#: A compressed (deflated) array may inflate to this many bytes whatever its compression ratio ...
MAX_INFLATED_BYTES = 256 * 2**20
#: ... and beyond it to at most this many times its compressed size. Image data deflates 2 to 10
#: times (the digits, shapes and canvas testbeds: 2.5 to 8.5); deflate's limit, about 1030 times,
#: is reached by one repeated byte: a small file declaring gigabytes of it (a zip bomb) is refused
#: from its headers, before any memory is taken.
MAX_DEFLATE_RATIO = 100


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def read_member(archive: Any, key: str, path: Path) -> np.ndarray:
    """``archive[key]`` after checking its ``.npy`` header: the size it declares must be what the
    file holds and fit in half of this machine's memory (a forged header claiming 183 GiB is an
    error, not an allocation); a compressed array larger than ``MAX_INFLATED_BYTES`` must not
    inflate more than ``MAX_DEFLATE_RATIO`` times (a few MiB that declare gigabytes are refused
    before they are inflated)."""
    name = f"{key}.npy"
    try:
        info = archive.zip.getinfo(name)
        with archive.zip.open(name) as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(f)
            header = f.tell()
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"'{path}': array {key} is unreadable ({' '.join(str(exc).split())[:120]})") from None
    count = math.prod(shape)
    declared = count * dtype.itemsize
    if dtype.hasobject:
        raise ValueError(f"'{path}': array {key} holds Python objects; save plain numeric arrays")
    if declared > info.file_size - header:
        raise ValueError(f"'{path}': array {key} declares {shape} {dtype} ({declared} bytes) but holds "
                         f"{info.file_size - header} bytes; the file is damaged")
    ratio = declared / max(info.compress_size, 1)
    if info.compress_type != zipfile.ZIP_STORED and declared > MAX_INFLATED_BYTES and ratio > MAX_DEFLATE_RATIO:
        raise ValueError(f"'{path}': array {key} declares {shape} {dtype} ({declared / 2**30:.1f} GiB) from "
                         f"{info.compress_size / 2**20:.1f} MiB of compressed data ({ratio:.0f}:1, images reach about "
                         f"10:1); not inflated: if the arrays are real, save them uncompressed (np.savez)")
    if declared > _memory_bytes() // 2:
        raise ValueError(f"'{path}': array {key} is {declared / 2**30:.1f} GiB, more than half of this machine's "
                         f"memory; split the file")
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, MemoryError) as exc:
        raise ValueError(f"'{path}': array {key} is unreadable ({' '.join(str(exc).split())[:120] or type(exc).__name__})") from None


def check_labels(labels: np.ndarray, count: int, path: Path) -> None:
    """Labels are integers, one per image, in 0..MAX_CLASSES-1."""
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"'{path}': labels must be integers of shape ({count},), got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"'{path}': labels must be >= 0, found {labels.min()}")
    if len(labels) and labels.max() >= MAX_CLASSES:
        raise ValueError(f"'{path}': labels must be below {MAX_CLASSES}, found {labels.max()}; number the classes 0..K-1")


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
        raise ValueError(f"'{path}' is not an .npz (not a zip archive of .npy arrays); the file is damaged or of another kind")
    try:
        with np.load(path, allow_pickle=False) as archive:
            for image_key, label_key in NPZ_KEYS:
                if image_key in archive.files:
                    labels = read_member(archive, label_key, path) if label_key in archive.files else None
                    return read_member(archive, image_key, path), labels
            keys = ", ".join(archive.files) or "none"
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"'{path}' is not a readable .npz ({' '.join(str(exc).split())[:120]})") from None
    raise ValueError(f"'{path}' has no image array (keys: {keys}; expected arr_0 or images)")


class NpzDataset(DiffusionDataset):
    """Images from a ``.npz`` file (ADM's reference-batch / sample layout), scaled to [-1, 1].

    Args:
        path: The ``.npz`` file: ``arr_0`` (or ``images``) uint8 (N, H, W, C) with C in {1, 3}, or
            (N, H, W) grayscale; optional ``arr_1`` (or ``labels``) integer (N,) labels.
        resolution: Expected side; must equal the arrays' (they are not resized).
        channels: 1 or 3 (converted from the stored ones when they differ); default: as stored.
        hflip: Random horizontal flips.
        conditional: Use the labels (when present); otherwise every label is 0.
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int | None = None,
        channels: int | None = None,
        hflip: bool = False,
        conditional: bool = True,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"npz file '{path}' does not exist")
        images, labels = _read_arrays(path)
        if images.dtype != np.uint8:
            raise ValueError(f"'{path}': images must be uint8 in [0, 255], got {images.dtype} (convert with .astype(np.uint8))")
        if images.ndim == 3:
            images = images[..., None]  # (N, H, W) -> (N, H, W, 1)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
            raise ValueError(f"'{path}': images must be (N, H, W, C) with H = W and C in 1 or 3, got shape {images.shape}")
        side = images.shape[1]
        if resolution is not None and resolution != side:
            raise ValueError(f"'{path}' holds {side}x{side} images but resolution={resolution} (set resolution={side} or resize the arrays)")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"npz images give 1 or 3 channels, got channels={channels}")
        if labels is not None:
            check_labels(labels, len(images), path)
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, C, H, W) uint8
        use_labels = conditional and labels is not None and len(labels) > 0
        self.labels = torch.from_numpy(labels.astype(np.int64)) if use_labels else None  # (N,)
        self.num_classes = int(labels.max()) + 1 if use_labels else 0
        self.class_names = None
        self.resolution, self.channels = side, channels or images.shape[-1]
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = match_channels(to_model_range(self.images[index]), self.channels)  # (C, H, W)
        return self._maybe_flip(x), label(self.labels[index] if self.labels is not None else 0)
