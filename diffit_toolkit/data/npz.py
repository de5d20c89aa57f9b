"""``.npz`` image arrays in ADM's layout: ``arr_0`` uint8 (N, H, W, C) images, optional ``arr_1`` labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.data.transforms import match_channels, to_model_range

#: Accepted (images, labels) key pairs, tried in order.
NPZ_KEYS = (("arr_0", "arr_1"), ("images", "labels"))


def _read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as archive:
        for image_key, label_key in NPZ_KEYS:
            if image_key in archive.files:
                return archive[image_key], archive[label_key] if label_key in archive.files else None
        keys = ", ".join(archive.files) or "none"
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
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"'{path}': labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
            if len(labels) and labels.min() < 0:
                raise ValueError(f"'{path}': labels must be >= 0, found {labels.min()}")
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
