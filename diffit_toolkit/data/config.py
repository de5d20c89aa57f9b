"""``DataConfig`` (the ``data:`` section of a recipe) and ``build_dataset``: one entry point for every kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from diffit_toolkit.data.base import DiffusionDataset
from diffit_toolkit.data.digits import DIGITS_SPLITS, DigitsDataset
from diffit_toolkit.data.image_folder import BAD_FILE_POLICIES, ImageFolderDataset
from diffit_toolkit.data.latents import LatentDataset
from diffit_toolkit.data.npz import NpzDataset
from diffit_toolkit.data.shapes import ShapesDataset

#: Dataset kinds and what ``path`` names for each (``None``: no path).
DATA_KINDS: dict[str, str | None] = {
    "digits": None,
    "shapes": None,
    "image_folder": "a folder of images",
    "npz": "an .npz file",
    "latents": "a latent cache folder made by `diffit-toolkit cache-latents`",
}


@dataclass
class DataConfig:
    """Which data to train or evaluate on; ``build()`` makes the dataset.

    Attributes:
        kind: ``digits`` (embedded, the default), ``image_folder``, ``npz`` or ``latents``.
        path: Folder or file of the data (every kind but ``digits``).
        resolution: Image side; required for ``image_folder``, upsamples ``digits`` (native 8), checked for ``npz`` and ``latents``.
        channels: 1 or 3 for images (default: 1 for digits, 3 for folders, as stored for npz); checked for ``latents``.
        hflip: Random horizontal flips (``latents``: the stored flipped variant is picked).
        conditional: Use class labels; ``False`` gives label 0 and ``num_classes`` 0 (flat folders).
        on_bad_file: Unreadable image files: ``skip`` (warn, count in ``dataset.skipped``) or ``stop`` (error naming the file).
        split: Digits only: ``train`` (default, 80 %), ``test`` (the held-out 20 %) or ``all``.
        verify: Image folders: check every file with PIL while indexing.
        interpolation: Digits: resampling when ``resolution`` is not 8 (``bilinear``, ``nearest``, ``bicubic``).
    """

    kind: str = "digits"
    path: str | None = None
    resolution: int | None = None
    channels: int | None = None
    hflip: bool = False
    conditional: bool = True
    on_bad_file: str = "skip"
    split: str | None = None
    verify: bool = True
    interpolation: str = "bilinear"

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for an invalid combination of options."""
        if self.kind not in DATA_KINDS:
            raise ValueError(f"unknown data kind '{self.kind}' (valid: {', '.join(DATA_KINDS)})")
        needs = DATA_KINDS[self.kind]
        if needs is None and self.path is not None:
            raise ValueError(f"kind='{self.kind}' takes no path (its data ship with the toolkit); remove path or set kind='image_folder'")
        if needs is not None and self.path is None:
            raise ValueError(f"kind='{self.kind}' needs path: {needs}")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"data path '{self.path}' does not exist (kind='{self.kind}' needs {needs})")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive image side, got {self.resolution}")
        if self.kind == "image_folder" and self.resolution is None:
            raise ValueError("kind='image_folder' needs resolution (images are center-cropped and resized to it), e.g. resolution=64")
        if self.kind != "latents" and self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3 for images, got {self.channels}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file must be one of {', '.join(BAD_FILE_POLICIES)}, got '{self.on_bad_file}'")
        if self.kind == "digits" and self.split not in (None, *DIGITS_SPLITS):
            raise ValueError(f"unknown digits split '{self.split}' (valid: {', '.join(DIGITS_SPLITS)})")
        if self.kind != "digits" and self.split is not None:
            raise ValueError(f"split applies to kind='digits' only; for kind='{self.kind}' point path at the split's own data")

    def build(self) -> DiffusionDataset:
        """Validate and construct the dataset (a ``torch.utils.data.Dataset`` of ``(x, y)``)."""
        self.validate()
        common = {"resolution": self.resolution, "channels": self.channels, "hflip": self.hflip, "conditional": self.conditional}
        path = str(Path(self.path).expanduser()) if self.path is not None else None
        if self.kind == "digits":
            return DigitsDataset(split=self.split or "train", interpolation=self.interpolation, **common)
        if self.kind == "shapes":
            return ShapesDataset(**common)
        if self.kind == "image_folder":
            return ImageFolderDataset(path, on_bad_file=self.on_bad_file, verify=self.verify, **common)
        if self.kind == "npz":
            return NpzDataset(path, **common)
        return LatentDataset(path, **common)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving with a run)."""
        return asdict(self)


def build_dataset(kind: str = "digits", **options: Any) -> DiffusionDataset:
    """Build a dataset of any kind: ``DataConfig(kind=kind, **options).build()``.

    Args:
        kind: ``digits``, ``image_folder``, ``npz`` or ``latents``.
        **options: Any other :class:`DataConfig` field.

    Raises:
        ValueError: One line naming an unknown option or an invalid value.
    """
    valid = [f.name for f in fields(DataConfig) if f.name != "kind"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown data option(s) {', '.join(unknown)} (valid: {', '.join(valid)})")
    return DataConfig(kind=kind, **options).build()
