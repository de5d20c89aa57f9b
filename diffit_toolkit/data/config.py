"""``DataConfig`` (the ``data:`` section of a recipe) and ``build_dataset``: one entry point for every kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar

from diffit_toolkit.data.base import DiffusionDataset
from diffit_toolkit.data.image_folder import BAD_FILE_POLICIES, check_resolution
from diffit_toolkit.errors import did_you_mean
from diffit_toolkit.registry import datasets


class DatasetKind:
    """A dataset kind (``data.kind`` in a recipe), registered by name in the ``dataset`` registry.

    Class attributes say what the kind takes;
    [`check`][diffit_toolkit.data.config.DatasetKind.check] adds its own one-line checks and
    `build` makes the dataset from a validated [`DataConfig`][diffit_toolkit.data.config.DataConfig].
    """

    #: What ``path`` names for this kind, or ``None`` when it takes no path (embedded data).
    path: ClassVar[str | None] = None
    #: The named splits of an embedded dataset (``data.split``); empty: the kind has none.
    splits: ClassVar[tuple[str, ...]] = ()
    #: Whether ``channels`` is an image channel count (1 or 3).
    image_channels: ClassVar[bool] = True
    #: File name of the kind's cached offline judge (a classifier and its feature space, used by
    #: ``ablate`` and ``benchmark``), or ``None`` when the kind has none; a new judge design
    #: takes a new name, so runs scored by the old one are not mistaken for the new.
    judge_file: ClassVar[str | None] = None

    @classmethod
    def judge(cls, path: Path) -> tuple[Callable[..., dict[str, Any]], float]:
        """The offline judge cached at ``path`` (trained there on first use): ``(score, held-out
        accuracy)``, where ``score(images, labels)`` returns at least ``fd`` and ``accuracy``."""
        raise NotImplementedError("this dataset kind has no offline judge")

    @classmethod
    def check(cls, config: DataConfig) -> None:
        """Raise a one-line ``ValueError`` for an option this kind cannot take."""

    @classmethod
    def build(cls, config: DataConfig) -> DiffusionDataset:
        raise NotImplementedError


@dataclass
class DataConfig:
    """Which data to train or evaluate on; ``build()`` makes the dataset.

    Attributes:
        kind: a registered dataset kind: ``digits`` (embedded, the default), ``digits_canvas``
            (embedded: the digits at random offsets on a 16x16 canvas), ``shapes`` (embedded),
            ``image_folder``, ``npz`` or ``latents``.
        path: Folder or file of the data (every kind but ``digits``).
        resolution: Image side; required for ``image_folder``, upsamples ``digits`` (native 8), the canvas side of
            ``digits_canvas`` (default 16), checked for ``npz`` and ``latents``.
        channels: 1 or 3 for images (default: 1 for digits, 3 for folders, as stored for npz); checked for ``latents``.
        hflip: Random horizontal flips (``latents``: the stored flipped variant is picked).
        conditional: Use class labels; ``False`` gives label 0 and ``num_classes`` 0 (flat folders).
        on_bad_file: Unreadable image files: ``skip`` (warn, count in ``dataset.skipped``) or ``stop`` (error naming the file).
        split: Digits: ``train`` (default, 80 %), ``test`` (the held-out 20 %) or ``all``; digits canvas:
            ``train`` (default), ``reference`` or ``floor`` (the two halves of the held-out digits).
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
        kind = dataset_kind(self.kind)
        needs = kind.path
        if needs is None and self.path is not None:
            raise ValueError(f"kind='{self.kind}' takes no path (its data ship with the toolkit); remove path or set kind='image_folder'")
        if needs is not None and self.path is None:
            raise ValueError(f"kind='{self.kind}' needs path: {needs}")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"data path '{self.path}' does not exist (kind='{self.kind}' needs {needs})")
        if self.resolution is not None:
            check_resolution(self.resolution)
        if kind.image_channels and self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3 for images, got {self.channels}")
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ValueError(f"on_bad_file must be one of {', '.join(BAD_FILE_POLICIES)}, got '{self.on_bad_file}'")
        if self.split is not None and not kind.splits:
            with_splits = " or ".join(f"kind='{e.name}'" for e in datasets.entries() if e.obj.splits)
            raise ValueError(f"split applies to {with_splits} only; for kind='{self.kind}' point path at the split's own data")
        if self.split is not None and self.split not in kind.splits:
            raise ValueError(f"unknown {self.kind} split '{self.split}' (valid: {', '.join(kind.splits)})")
        kind.check(self)

    def build(self) -> DiffusionDataset:
        """Validate and construct the dataset (a ``torch.utils.data.Dataset`` of ``(x, y)``)."""
        self.validate()
        return dataset_kind(self.kind).build(self)

    def common_options(self) -> dict[str, Any]:
        """The options every image-like dataset takes."""
        return {"resolution": self.resolution, "channels": self.channels, "hflip": self.hflip, "conditional": self.conditional}

    def local_path(self) -> str | None:
        """``path`` with ``~`` expanded."""
        return str(Path(self.path).expanduser()) if self.path is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving with a run)."""
        return asdict(self)


def dataset_kind(name: str) -> type[DatasetKind]:
    """The registered dataset kind ``name`` (``ValueError`` with the valid kinds otherwise)."""
    if name not in datasets:
        raise ValueError(f"unknown data kind '{name}'{did_you_mean(name, datasets.names())} (valid: {', '.join(datasets.names())})")
    return datasets.get(name)


def build_dataset(kind: str = "digits", **options: Any) -> DiffusionDataset:
    """Build a dataset of any kind: ``DataConfig(kind=kind, **options).build()``.

    Args:
        kind: ``digits``, ``image_folder``, ``npz`` or ``latents``.
        **options: Any other [`DataConfig`][diffit_toolkit.data.config.DataConfig] field.

    Raises:
        ValueError: One line naming an unknown option or an invalid value.
    """
    valid = [f.name for f in fields(DataConfig) if f.name != "kind"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown data option(s) {', '.join(unknown)} (valid: {', '.join(valid)})")
    return DataConfig(kind=kind, **options).build()
