"""Image folders: class subfolders (labels in sorted folder order) or flat (unconditional)."""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import torch
from PIL import Image

from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.data.transforms import PIL_MODES, pil_to_model
from diffit_toolkit.errors import UsageError

#: File name endings read as images (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: What to do with an unreadable file: skip it (warn, count it in ``skipped``) or stop with an error.
BAD_FILE_POLICIES = ("skip", "stop")
#: Errors PIL raises for corrupted, truncated, oversized or unsupported files (MemoryError: a
#: decode or resize that does not fit).
IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError, MemoryError,
)
#: Largest decoded image accepted (pixels), checked from the header before decoding.
MAX_IMAGE_PIXELS = 2**26
#: Largest image side a dataset produces (an 8192 x 8192 float image alone is 0.8 GB; every model
#: and VAE in this field works far below it).
MAX_RESOLUTION = 4096
#: Largest ratio of the long to the short side (the center crop scales the short side to the
#: resolution, so a 4,000,000 x 1 strip would become gigabytes).
MAX_ASPECT_RATIO = 32
#: Files named in the summary warning of skipped files (all of them are in ``dataset.skipped``).
_NAMED_IN_SUMMARY = 5


class BadImageError(UsageError, ValueError):
    """An unreadable image file met with ``on_bad_file="stop"`` (the message names the file)."""


def _error_text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (after following its links) is inside the resolved ``root``."""
    try:
        path.resolve(strict=True).relative_to(root)
    except (OSError, ValueError, RuntimeError):  # dangling, looping, or outside
        return False
    return True


def list_images(folder: Path, root: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden files and folders left out), sorted.

    Linked folders are not followed (a link back into the data would loop or count images twice)
    and linked files count only when they lead to a file inside ``root`` (default ``folder``)."""
    base = (root or folder).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if _is_image(path) and (not path.is_symlink() or _inside(path, base)):
                found.append(path)
    return sorted(found)


def check_image_size(image: Image.Image) -> None:
    """Raise ``ValueError`` for an image too large or too elongated to decode and crop safely."""
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{width}x{height} pixels is beyond the limit of {MAX_IMAGE_PIXELS} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"{width}x{height} is more elongated than {MAX_ASPECT_RATIO}:1")


def check_resolution(resolution: int) -> None:
    """One-line ``ValueError`` unless ``resolution`` is an image side from 1 to `MAX_RESOLUTION`."""
    if not 1 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be an image side from 1 to {MAX_RESOLUTION} pixels, got {resolution}")


def verify_image(path: Path) -> None:
    """Raise one of `IMAGE_ERRORS` if PIL cannot identify ``path``, finds it truncated or
    corrupted, or its header declares a size beyond
    [`check_image_size`][diffit_toolkit.data.image_folder.check_image_size]'s bounds."""
    with Image.open(path) as image:
        check_image_size(image)
        image.verify()


class ImageFolderDataset(DiffusionDataset):
    """A folder of images, ADM-center-cropped to ``resolution`` and scaled to [-1, 1].

    With ``conditional=True`` each subfolder is a class (labels follow the sorted folder names,
    files are found recursively inside each); with ``conditional=False`` every image under the
    folder is used with label 0. Unreadable files are found while indexing (``verify``) and,
    should one still fail to decode, when loaded; they are skipped (a warning names them, and
    ``skipped`` lists them) or, with ``on_bad_file="stop"``, raise
    [`BadImageError`][diffit_toolkit.data.image_folder.BadImageError].
    A file that fails at load time is replaced by the next readable one; ``skipped`` is then
    only updated in the process that loaded it (a ``DataLoader`` worker).

    Args:
        path: The folder.
        resolution: Output side.
        channels: 3 (RGB, default) or 1 (L).
        hflip: Random horizontal flips.
        conditional: Class subfolders (``True``) or a flat, unconditional folder.
        on_bad_file: ``"skip"`` or ``"stop"``.
        verify: Check every file with PIL while indexing (reads each file once).
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int,
        channels: int | None = None,
        hflip: bool = False,
        conditional: bool = True,
        on_bad_file: str = "skip",
        verify: bool = True,
    ) -> None:
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"image folder '{root}' does not exist or is not a folder")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file must be one of {', '.join(BAD_FILE_POLICIES)}, got '{on_bad_file}'")
        check_resolution(resolution)
        self.root, self.resolution, self.channels = root, resolution, channels or 3
        if self.channels not in PIL_MODES:
            raise ValueError(f"image folders give 1 or 3 channels, got channels={self.channels}")
        self.hflip, self.on_bad_file = hflip, on_bad_file
        self.skipped: list[str] = []
        self._skipped_set: set[str] = set()
        if conditional:
            # class folders are real folders: a link (to elsewhere, or back to the data) is not a class
            folders = {d.name: list_images(d, root) for d in sorted(root.iterdir())
                       if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")}
            classes = [name for name, files in folders.items() if files]  # sorted folder names
            if not classes:
                raise ValueError(f"no class subfolders with images in '{root}' (use conditional=False for a flat folder)")
            self.class_names: list[str] | None = classes
            self.num_classes = len(classes)
            candidates = [(p, y) for y, name in enumerate(classes) for p in folders[name]]
        else:
            self.class_names, self.num_classes = None, 0
            candidates = [(p, 0) for p in list_images(root)]
        self.samples: list[tuple[Path, int]] = []
        for file, y in candidates:
            if verify and not self._readable(file):
                continue
            self.samples.append((file, y))
        if self.skipped:
            named = ", ".join(self.skipped[:_NAMED_IN_SUMMARY]) + (", ..." if len(self.skipped) > _NAMED_IN_SUMMARY else "")
            warnings.warn(f"skipped {len(self.skipped)} unreadable image file(s) in '{root}': {named} (see dataset.skipped)", stacklevel=2)
        if not self.samples:
            raise ValueError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) in '{root}'")

    def _bad_file(self, file: Path, exc: BaseException) -> None:
        """Record (skip) or raise for an unreadable file."""
        if self.on_bad_file == "stop":
            raise BadImageError(f"unreadable image file '{file}': {_error_text(exc)} (remove it, or set on_bad_file='skip')") from exc
        self.skipped.append(str(file))
        self._skipped_set.add(str(file))

    def _readable(self, file: Path) -> bool:
        try:
            verify_image(file)
        except IMAGE_ERRORS as exc:
            self._bad_file(file, exc)
            return False
        return True

    def load(self, index: int) -> torch.Tensor:
        """The image at ``index`` as (C, H, W) in [-1, 1], unflipped; raises one of
        `IMAGE_ERRORS` if unreadable (or changed since the scan into an oversized one)."""
        with Image.open(self.samples[index][0]) as image:
            check_image_size(image)
            return pil_to_model(image, self.resolution, self.channels)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} images")  # ends a plain loop
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            file = self.samples[i][0]
            if str(file) in self._skipped_set:
                continue
            try:
                x = self.load(i)
            except IMAGE_ERRORS as exc:
                self._bad_file(file, exc)
                warnings.warn(f"skipping unreadable image file '{file}': {_error_text(exc)}", stacklevel=2)
                continue
            return self._maybe_flip(x), label(self.samples[i][1])
        raise ValueError(f"no readable images left in '{self.root}' ({len(self.skipped)} skipped)")
