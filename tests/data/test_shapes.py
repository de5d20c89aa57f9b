"""The embedded shapes: deterministic from the seed, exactly balanced, in range, usable as a recipe's data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.data import build_dataset
from diffit_toolkit.data import shapes as shapes_module
from diffit_toolkit.data.shapes import SHAPE_CLASSES, make_shapes, render_shape, shape_mask


def test_same_seed_same_images_other_seed_other_images():
    a = render_shape(3, np.random.default_rng([0, 0, 7]))
    b = render_shape(3, np.random.default_rng([0, 0, 7]))
    c = render_shape(3, np.random.default_rng([1, 0, 7]))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


def test_make_shapes_is_reproducible_and_image_i_does_not_depend_on_the_count(monkeypatch):
    monkeypatch.setattr(shapes_module, "_MEMO", {})
    x1, y1 = make_shapes("train", num=30)
    monkeypatch.setattr(shapes_module, "_MEMO", {})
    x2, y2 = make_shapes("train", num=30)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    monkeypatch.setattr(shapes_module, "_MEMO", {})
    x3, _ = make_shapes("train", num=12)
    assert torch.equal(x3, x1[:12])
    xt, _ = make_shapes("test", num=30)
    assert not torch.equal(xt, x1)  # the held-out split is another random stream


def test_classes_are_exactly_balanced_and_images_in_range():
    x, y = make_shapes("train", num=50)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32
    assert torch.bincount(y, minlength=10).tolist() == [5] * 10
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("kind", range(len(SHAPE_CLASSES)))
def test_every_class_has_a_distinct_nonempty_outline(kind):
    v, u = np.mgrid[-1:1:64j, -1:1:64j]
    masks = [shape_mask(k, u, v) for k in range(len(SHAPE_CLASSES))]
    area = masks[kind].mean()
    assert 0.05 < area < 0.8, SHAPE_CLASSES[kind]
    for other in range(len(SHAPE_CLASSES)):
        if other != kind:
            assert (masks[kind] != masks[other]).mean() > 0.02, (SHAPE_CLASSES[kind], SHAPE_CLASSES[other])


def test_shapes_is_a_data_kind_with_the_usual_options(monkeypatch):
    monkeypatch.setattr(shapes_module, "SHAPES_SPLIT_SIZES", {"train": 40, "test": 20})  # the real split: 10 000
    ds = build_dataset("shapes", resolution=16, channels=1)
    assert len(ds) == 40 and ds.num_classes == 10 and ds.class_names[0] == "circle"
    x, y = ds[13]
    assert x.shape == (1, 16, 16) and int(y) == 3
    with pytest.raises(ValueError, match="takes no path"):
        build_dataset("shapes", path="somewhere")
