"""The shapes canvas: deterministic, in range, shapes where their geometry says, splits disjoint streams."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.data import build_dataset
from diffit_toolkit.data import shapes_canvas as module
from diffit_toolkit.data.shapes_canvas import RADIUS_RANGE, SHAPES_CANVAS_CLASSES, make_shapes_canvas


def test_images_are_deterministic_and_the_seed_changes_them(monkeypatch):
    x1, y1, g1 = make_shapes_canvas("reference")
    monkeypatch.setattr(module, "_MEMO", {})
    x2, y2, g2 = make_shapes_canvas("reference")
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(g1, g2)
    x3, y3, _ = make_shapes_canvas("reference", seed=1)
    assert torch.equal(y1, y3) and not torch.equal(x1, x3)


def test_each_shape_lies_where_its_geometry_says_and_is_balanced():
    x, y, geometry = make_shapes_canvas("floor")
    assert x.shape == (1440, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.bincount(y).tolist() == [360] * len(SHAPES_CANVAS_CLASSES)
    ink = (x[:, 0] + 1) / 2  # (N, 16, 16) in [0, 1]
    rows, cols = torch.meshgrid(torch.arange(16) + 0.5, torch.arange(16) + 0.5, indexing="ij")
    mass = ink.sum(dim=(1, 2))
    centre = torch.stack([(ink * rows).sum(dim=(1, 2)) / mass, (ink * cols).sum(dim=(1, 2)) / mass], dim=1)
    off = (centre - geometry[:, :2]).abs()
    # every class is symmetric about its centre's rotations: the centroid is the centre, up to the
    # renderer's 4x supersampling
    assert off.max() < 0.15 and off.mean() < 0.02
    circles = y == SHAPES_CANVAS_CLASSES.index("circle")
    area = torch.pi * geometry[circles, 2] ** 2
    assert torch.allclose(mass[circles], area, rtol=0.05)  # the ink of a circle is its area
    # positions and sizes spread over the whole range
    assert geometry[:, :2].min() < 3.5 and geometry[:, :2].max() > 12.5
    assert geometry[:, 2].min() < RADIUS_RANGE[0] + 0.1 and geometry[:, 2].max() > RADIUS_RANGE[1] - 0.1


def test_the_splits_are_different_streams():
    train, reference, floor = (make_shapes_canvas(s)[0] for s in ("train", "reference", "floor"))
    assert len(train) == 20_000 and len(reference) == len(floor) == 1440
    flat = lambda t: {bytes(row.numpy().tobytes()) for row in t.flatten(1)}  # noqa: E731
    assert not flat(reference) & flat(floor) and not flat(reference) & flat(train[:5000])


def test_shapes_canvas_is_a_data_kind():
    ds = build_dataset("shapes_canvas", conditional=False)
    assert len(ds) == 20_000 and ds.num_classes == 0 and ds.resolution == 16 and ds.channels == 1
    x, y = ds[3]
    assert x.shape == (1, 16, 16) and int(y) == 0
    ds = build_dataset("shapes_canvas", split="reference", channels=3)
    assert ds.num_classes == 4 and ds.class_names == list(SHAPES_CANVAS_CLASSES) and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="valid: train, reference, floor"):
        build_dataset("shapes_canvas", split="test")
    with pytest.raises(ValueError, match="16x16 only"):
        build_dataset("shapes_canvas", resolution=32)
    with pytest.raises(ValueError, match="takes no path"):
        build_dataset("shapes_canvas", path="somewhere")
