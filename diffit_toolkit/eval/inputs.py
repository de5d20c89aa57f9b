"""Inputs of ``diffit-toolkit eval``: image folders, ADM-layout ``.npz`` samples and ADM reference
batches (``.npz`` with ``mu``/``sigma``, optionally ``arr_0``).

Everything becomes an [`ImageSet`][diffit_toolkit.eval.inputs.ImageSet]: uint8 (N, 3, H, W) images
(gray expanded to RGB),
optional labels and optional stored Gaussian statistics. Bad inputs raise
[`InputError`][diffit_toolkit.eval.inputs.InputError]
with a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffit_toolkit.errors import UsageError
from diffit_toolkit.eval.frechet import GaussianStats

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class InputError(UsageError, ValueError):
    """An evaluation input that cannot be read; the message is one line."""


@dataclass
class ImageSet:
    """Images to evaluate or compare against.

    Attributes:
        source: where they came from (for messages).
        images: uint8 (N, 3, H, W) tensor, or ``None`` for a statistics-only reference batch.
        labels: int64 (N,) requested classes (``arr_1`` of an ADM ``.npz``), or ``None``.
        stats: stored Inception statistics (``mu``/``sigma`` of an ADM reference batch), or ``None``.
    """

    source: str
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    stats: GaussianStats | None = None

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.images is None else (int(self.images.shape[2]), int(self.images.shape[3]))


def _nhwc_to_tensor(arr: np.ndarray, source: str) -> torch.Tensor:
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise InputError(f"{source}: arr_0 must be uint8 images (N, H, W, 1 or 3) as in the ADM layout, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) or arr.min() < 0 or arr.max() > 255:
            raise InputError(f"{source}: arr_0 must be uint8 in [0, 255] (ADM layout), got {arr.dtype}")
        arr = arr.astype(np.uint8)
    if len(arr) == 0:
        raise InputError(f"{source}: arr_0 holds no images")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def load_npz(path: Path) -> ImageSet:
    """Samples (``arr_0`` uint8 NHWC, optional ``arr_1`` labels) or an ADM reference batch (``mu``/``sigma``)."""
    import zipfile

    from diffit_toolkit.data.npz import check_labels, read_member

    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
        raise InputError(f"{path}: not an .npz (not a zip archive of .npy arrays); the file is damaged or of another kind")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    try:
        with data:  # closed however the reading ends (a refused member must not leave the file open)
            arrays = {k: read_member(data, k, path) for k in ("mu", "sigma", "arr_0", "arr_1") if k in keys}
    except ValueError as exc:
        raise InputError(str(exc)) from None
    stats = None
    if "mu" in keys or "sigma" in keys:
        if not {"mu", "sigma"} <= keys:
            raise InputError(f"{path}: a reference batch needs both 'mu' and 'sigma'")
        mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise InputError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        stats = GaussianStats(mu, sigma)
    if "arr_0" not in keys and stats is None:
        raise InputError(f"{path}: expected 'arr_0' (ADM samples) or 'mu'/'sigma' (ADM reference batch), found {sorted(keys) or 'no arrays'}")
    images = _nhwc_to_tensor(arrays["arr_0"], str(path)) if "arr_0" in keys else None
    labels = None
    if "arr_1" in keys and images is not None:
        raw = np.asarray(arrays["arr_1"]).reshape(-1)
        if len(raw) != len(images):
            raise InputError(f"{path}: {len(images)} images but {len(raw)} labels in arr_1")
        try:
            check_labels(raw, len(images), path)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        labels = torch.from_numpy(raw.astype(np.int64))
    return ImageSet(str(path), images, labels, stats)


def load_folder(path: Path) -> ImageSet:
    """Every image file under ``path`` (recursively, sorted); all must share one size."""
    from PIL import Image

    from diffit_toolkit.data.image_folder import IMAGE_ERRORS, check_image_size, list_images
    from diffit_toolkit.data.transforms import to_8bit

    files = list_images(path)
    if not files:
        raise InputError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                check_image_size(img)
                arr = np.asarray(to_8bit(img).convert("RGB"))
        except IMAGE_ERRORS as exc:
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise InputError(f"{file}: unreadable image ({text})") from None
        if arrays and arr.shape != arrays[0].shape:
            raise InputError(f"{file}: size {arr.shape[1]}x{arr.shape[0]} differs from {arrays[0].shape[1]}x{arrays[0].shape[0]} of {files[0].name}; resize the folder to one size")
        arrays.append(arr)
    return ImageSet(str(path), torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous())


def load_image_set(path: str | Path) -> ImageSet:
    """An image folder, an ADM ``.npz`` of samples or an ADM reference batch."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return load_folder(path)
    if not path.is_file():  # reading a FIFO, a socket or a device would block or never end
        raise InputError(f"{path}: not a regular file (a pipe, socket or device); give an .npz file or an image folder")
    if path.suffix == ".npz":
        return load_npz(path)
    raise InputError(f"{path}: expected an image folder or an .npz file")
