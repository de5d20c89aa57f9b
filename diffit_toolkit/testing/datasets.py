"""The conformance kit for dataset kinds: what every dataset the trainer reads must give.

A kind is built from a [`DataConfig`][diffit_toolkit.data.config.DataConfig] (its name plus the
options given), as a recipe builds it. Only embedded kinds (``path = None``) build without files;
a kind that reads files is checked when the options name a ``path``.
"""

from __future__ import annotations

import unittest
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffit_toolkit.data.base import DiffusionDataset
from diffit_toolkit.data.config import DataConfig, DatasetKind
from diffit_toolkit.registry import datasets
from diffit_toolkit.testing.core import (
    ConformanceReport,
    NotApplicable,
    Property,
    PropertyCheck,
    bind,
    expect,
    global_seeds,
    run_checks,
    run_property,
)

__all__ = [
    "BALANCE_TOLERANCE",
    "DATASET_PROPERTIES",
    "MAX_ITEMS",
    "DatasetTarget",
    "check_dataset",
    "dataset_checks",
    "embedded_kinds",
]

#: Items read per property (evenly spread over a larger dataset).
MAX_ITEMS = 50_000
#: Items compared between the two builds of the determinism check.
COMPARED_ITEMS = 256
#: Largest relative deviation of a class's count from the mean count per class.
BALANCE_TOLERANCE = 0.1


@dataclass(frozen=True)
class DatasetTarget:
    """A dataset kind as the kit checks it.

    Attributes:
        name: registered name (or the class's ``__name__``).
        kind: the [`DatasetKind`][diffit_toolkit.data.config.DatasetKind] subclass.
        options: [`DataConfig`][diffit_toolkit.data.config.DataConfig] fields besides ``kind``.
        max_items: items read per property.
    """

    name: str
    kind: type[DatasetKind]
    options: dict[str, Any] = field(default_factory=dict)
    max_items: int = MAX_ITEMS

    @property
    def subject(self) -> str:
        return f"dataset kind '{self.name}'"

    def build(self) -> DiffusionDataset:
        """The dataset, as a recipe's ``data`` section builds it."""
        if self.kind.path is not None and self.options.get("path") is None:
            raise unittest.SkipTest(f"{self.subject} reads {self.kind.path}: give options={{'path': ...}}")
        config = DataConfig(kind=self.name, **self.options)
        if self.name in datasets and datasets.get(self.name) is self.kind:
            return config.build()
        self.kind.check(config)  # a class that is not registered: its own checks only
        return self.kind.build(config)

    def indices(self, dataset: DiffusionDataset, limit: int | None = None) -> list[int]:
        """Up to ``limit`` (default ``max_items``) indices spread evenly over the dataset."""
        n, limit = len(dataset), limit or self.max_items
        return list(range(n)) if n <= limit else [i * n // limit for i in range(limit)]


def _label(y: Any) -> int:
    return int(y.item()) if isinstance(y, Tensor) else int(y)


# -- the properties, one function each ------------------------------------------------------------


def _builds_not_empty(t: DatasetTarget) -> None:
    dataset = t.build()
    expect(len(dataset) > 0, "the dataset is empty (len 0)")


def _items_as_declared(t: DatasetTarget) -> None:
    dataset = t.build()
    for key in ("channels", "resolution"):
        wanted = t.options.get(key)
        have = getattr(dataset, key, None)
        expect(wanted is None or have == wanted, f"built with {key}={wanted}, the dataset declares {key}={have}")
    shape = (dataset.channels, dataset.resolution, dataset.resolution)
    for i in t.indices(dataset):
        item = dataset[i]
        expect(isinstance(item, tuple) and len(item) == 2, f"item {i} is not an (x, y) pair")
        x, y = item
        expect(isinstance(x, Tensor), f"item {i}: x is a {type(x).__name__}, not a tensor")
        expect(x.dtype == torch.float32, f"item {i}: x is {x.dtype}, not float32")
        expect(tuple(x.shape) == shape, f"item {i}: x has shape {tuple(x.shape)}; the dataset declares (C, H, W) = {shape}")
        expect(bool(torch.isfinite(x).all()), f"item {i}: x is not finite")
        if isinstance(y, Tensor):
            expect(y.dtype == torch.int64 and y.ndim == 0, f"item {i}: y is a {y.dtype} tensor of shape "
                                                             f"{tuple(y.shape)}, not an int64 scalar")
        else:
            expect(isinstance(y, int), f"item {i}: y is a {type(y).__name__}, not an int64 scalar")


def _images_in_range(t: DatasetTarget) -> None:
    dataset = t.build()
    lo, hi = float("inf"), float("-inf")
    for i in t.indices(dataset):
        x = dataset[i][0]
        lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
    expect(-1.0 <= lo and hi <= 1.0, f"images span {lo:.3g}..{hi:.3g}, outside [-1, 1]")


def _labels_in_range(t: DatasetTarget) -> None:
    dataset = t.build()
    classes = int(getattr(dataset, "num_classes", 0))
    names = getattr(dataset, "class_names", None)
    expect(names is None or len(names) == classes, f"{len(names or [])} class_names for num_classes={classes}")
    for i in t.indices(dataset):
        y = _label(dataset[i][1])
        if classes:
            expect(0 <= y < classes, f"item {i} has label {y}, outside 0..{classes - 1} (num_classes={classes})")
        else:
            expect(y == 0, f"item {i} of an unconditional dataset has label {y}, not 0")


def _classes_balanced(t: DatasetTarget) -> None:
    dataset = t.build()
    classes = int(getattr(dataset, "num_classes", 0))
    if not classes:
        raise NotApplicable(f"{t.subject} is unconditional here (num_classes=0)")
    counts = Counter(_label(dataset[i][1]) for i in t.indices(dataset))
    mean = sum(counts.values()) / classes
    for c in range(classes):
        share = counts.get(c, 0) / mean
        expect(abs(share - 1) <= BALANCE_TOLERANCE,
               f"class {c} has {counts.get(c, 0)} items, {share:.2f} times the mean {mean:.1f} "
               f"(tolerance 1 +- {BALANCE_TOLERANCE})")


def _deterministic(t: DatasetTarget) -> None:
    with global_seeds(1):
        first = t.build()
    with global_seeds(2):
        second = t.build()
    expect(len(first) == len(second), f"two builds have {len(first)} and {len(second)} items")
    for i in t.indices(first, COMPARED_ITEMS):
        with global_seeds(0):  # the same draws for random flips
            a = first[i]
        with global_seeds(0):
            b = second[i]
        expect(torch.equal(a[0], b[0]) and _label(a[1]) == _label(b[1]),
               f"two builds differ at item {i} (randomness drawn from the global random state?)")


def _dataset_property(name: str, test: Callable[[DatasetTarget], None],
                      applies: Callable[[DatasetTarget], bool] | None = None) -> Property[DatasetTarget]:
    return Property(name, lambda t: run_property(t.subject, name, lambda: test(t)), applies or (lambda t: True))


#: The properties of a dataset kind, by name, in the order
#: [`check_dataset`][diffit_toolkit.testing.datasets.check_dataset] checks them.
DATASET_PROPERTIES: dict[str, Property[DatasetTarget]] = {
    p.name: p
    for p in (
        _dataset_property("builds and is not empty", _builds_not_empty),
        _dataset_property("items as declared", _items_as_declared),
        _dataset_property("image range", _images_in_range, applies=lambda t: t.kind.image_channels),
        _dataset_property("labels in range", _labels_in_range),
        _dataset_property("classes balanced", _classes_balanced,
                          applies=lambda t: t.options.get("conditional", True) is not False),
        _dataset_property("deterministic", _deterministic),
    )
}


def embedded_kinds() -> list[str]:
    """The registered dataset kinds that build without files (``path = None``)."""
    return [e.name for e in datasets.entries() if getattr(e.obj, "path", None) is None]


def dataset_target(kind: str | type[DatasetKind], *, options: dict[str, Any] | None = None,
                   max_items: int = MAX_ITEMS) -> DatasetTarget:
    """The [`DatasetTarget`][diffit_toolkit.testing.datasets.DatasetTarget] of a class or a
    registered name."""
    options = dict(options or {})
    if "kind" in options:
        raise TypeError("give the dataset kind as the first argument, not in options")
    if isinstance(kind, str):
        return DatasetTarget(kind, datasets.get(kind), options, max_items)
    if isinstance(kind, type) and issubclass(kind, DatasetKind):
        return DatasetTarget(kind.__name__, kind, options, max_items)
    raise TypeError(f"expected a registered dataset kind or a DatasetKind class, got {kind!r}")


def dataset_checks(kind: str | type[DatasetKind], *, options: dict[str, Any] | None = None,
                   max_items: int = MAX_ITEMS) -> list[PropertyCheck]:
    """One check per property of a dataset kind, for ``@pytest.mark.parametrize`` (one test each;
    arguments as [`check_dataset`][diffit_toolkit.testing.datasets.check_dataset])."""
    target = dataset_target(kind, options=options, max_items=max_items)
    return bind(target.name, target, DATASET_PROPERTIES.values())


def check_dataset(kind: str | type[DatasetKind], *, options: dict[str, Any] | None = None,
                  max_items: int = MAX_ITEMS) -> ConformanceReport:
    """Check a dataset kind; raise on the first failed property.

    Properties, in order (see
    [`DATASET_PROPERTIES`][diffit_toolkit.testing.datasets.DATASET_PROPERTIES]):

    * **builds and is not empty**: the kind builds from the options, with ``len > 0``.
    * **items as declared**: every item is ``(x, y)``: ``x`` a finite float32 tensor of shape
      ``(channels, resolution, resolution)`` as the dataset declares (and as the options ask,
      when they set ``channels`` or ``resolution``), ``y`` an int64 scalar.
    * **image range**: for image kinds (``image_channels``), every value lies in [-1, 1].
    * **labels in range**: ``0 <= y < num_classes`` (``y = 0`` when unconditional), and
      ``class_names`` has one name per class when given.
    * **classes balanced**: for conditional datasets, every class holds the mean count per class
      to within [`BALANCE_TOLERANCE`][diffit_toolkit.testing.datasets.BALANCE_TOLERANCE].
    * **deterministic**: two builds, from different global random states, give identical items.

    Args:
        kind: a registered dataset kind or a [`DatasetKind`][diffit_toolkit.data.config.DatasetKind] subclass.
        options: [`DataConfig`][diffit_toolkit.data.config.DataConfig] fields (``split``,
            ``resolution``, ``channels``, ``conditional``, ``path``, ...).
        max_items: items read per property (evenly spread over a larger dataset).

    Returns:
        A [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport].

    Raises:
        unittest.SkipTest: the kind reads files and the options name no ``path``.
        ConformanceError: one line naming the kind, the property and what failed.
    """
    target = dataset_target(kind, options=options, max_items=max_items)
    if target.kind.path is not None and target.options.get("path") is None:
        target.build()  # raises the SkipTest naming what the kind reads
    return run_checks(target.subject, bind(target.name, target, DATASET_PROPERTIES.values()))
