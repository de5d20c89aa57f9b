"""The dataset kit over every embedded dataset kind, and proof that it fails broken ones."""

from __future__ import annotations

import unittest

import pytest
import torch

from diffit_toolkit.data import DatasetKind
from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.testing import DATASET_PROPERTIES, ConformanceError, check_dataset, dataset_checks
from diffit_toolkit.testing.datasets import embedded_kinds

# dataset_check: one test per dataset kind that builds without files, and property.
pytest_plugins = ["diffit_toolkit.testing"]


def test_every_embedded_dataset_kind_has_every_property(dataset_check):
    dataset_check()


def test_the_embedded_kinds_are_the_ones_without_a_path():
    assert {"digits", "digits_canvas", "shapes"} <= set(embedded_kinds())
    assert not {"image_folder", "npz", "latents"} & set(embedded_kinds())


def test_options_reach_the_dataset():
    report = check_dataset("digits", options={"split": "test", "channels": 3})
    assert report.subject == "dataset kind 'digits'" and report.passed == tuple(DATASET_PROPERTIES)


def test_an_unconditional_dataset_has_no_balance_to_check():
    assert [c.property for c in dataset_checks("digits", options={"conditional": False})] == [
        p for p in DATASET_PROPERTIES if p != "classes balanced"]


def test_a_kind_that_reads_files_is_skipped_without_a_path():
    with pytest.raises(unittest.SkipTest, match="dataset kind 'npz' reads an .npz file"):
        check_dataset("npz")


# -- broken dataset kinds ----------------------------------------------------------------------


class Toy(DiffusionDataset):
    """20 one-channel 4x4 images in [-1, 1], two classes of 10."""

    def __init__(self, images=None, labels=None, num_classes=2):
        self.images = torch.linspace(-1, 1, 20 * 16).reshape(20, 1, 4, 4) if images is None else images
        self.labels = torch.arange(len(self.images)) % 2 if labels is None else labels
        self.num_classes, self.channels, self.resolution = num_classes, 1, 4

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], label(self.labels[i])


class Good(DatasetKind):
    @classmethod
    def build(cls, config):
        return Toy()


class PixelValues(Good):
    """Images in [0, 255]: the scaling to [-1, 1] forgotten."""

    @classmethod
    def build(cls, config):
        return Toy(images=torch.linspace(0, 255, 20 * 16).reshape(20, 1, 4, 4))


class LabelTooLarge(Good):
    @classmethod
    def build(cls, config):
        return Toy(labels=torch.arange(20) % 3)


class Imbalanced(Good):
    @classmethod
    def build(cls, config):
        return Toy(labels=(torch.arange(20) >= 16).long())


class DrawnFromGlobalState(Good):
    @classmethod
    def build(cls, config):
        return Toy(images=torch.rand(20, 1, 4, 4) * 2 - 1)


class Empty(Good):
    @classmethod
    def build(cls, config):
        return Toy(images=torch.zeros(0, 1, 4, 4))


class Float64(Good):
    @classmethod
    def build(cls, config):
        return Toy(images=Toy().images.double())


class IgnoresResolution(Good):
    """Declares the resolution it was asked for, but its images stay 4x4."""

    @classmethod
    def build(cls, config):
        dataset = Toy()
        dataset.resolution = config.resolution or 4
        return dataset


def test_a_correct_kind_passes():
    assert check_dataset(Good).passed == tuple(DATASET_PROPERTIES)


@pytest.mark.parametrize(
    ("cls", "options", "prop", "detail"),
    [
        (PixelValues, {}, "image range", "images span 0..255, outside [-1, 1]"),
        (LabelTooLarge, {}, "labels in range", "has label 2, outside 0..1"),
        (Imbalanced, {}, "classes balanced", "class 0 has 16 items, 1.60 times the mean 10.0"),
        (DrawnFromGlobalState, {}, "deterministic", "two builds differ at item 0"),
        (Empty, {}, "builds and is not empty", "the dataset is empty"),
        (Float64, {}, "items as declared", "x is torch.float64, not float32"),
        (IgnoresResolution, {"resolution": 8}, "items as declared", "x has shape (1, 4, 4); the dataset declares"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_the_kit_fails_a_broken_dataset_kind_in_one_line(cls, options, prop, detail):
    with pytest.raises(ConformanceError) as info:
        check_dataset(cls, options=options)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"dataset kind '{cls.__name__}': {prop} failed: ")
    assert detail in message
