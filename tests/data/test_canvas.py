"""The digits canvas: deterministic, in range, offsets spread over the canvas, splits disjoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.data import build_dataset
from diffit_toolkit.data import canvas as canvas_module
from diffit_toolkit.data.canvas import CANVAS_PLACEMENTS, canvas_glyph_indices, make_canvases, paste


def test_canvases_are_deterministic_and_the_seed_moves_the_digits(monkeypatch):
    x1, y1, o1 = make_canvases("train")
    monkeypatch.setattr(canvas_module, "_MEMO", {})
    x2, y2, o2 = make_canvases("train")
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(o1, o2)
    x3, y3, o3 = make_canvases("train", seed=1)
    assert torch.equal(y1, y3) and not torch.equal(o1, o3)


def test_images_in_range_with_the_glyph_where_its_offset_says():
    from sklearn.datasets import load_digits

    x, y, offsets = make_canvases("reference")
    assert x.shape == (1440, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    glyph_index = canvas_glyph_indices("reference")
    raw = torch.from_numpy(load_digits().images).float() / 8 - 1
    for i in (0, 181, 1439):
        r, c = offsets[i].tolist()
        glyph = raw[glyph_index[i % 180]]
        assert torch.allclose(x[i, 0, r : r + 8, c : c + 8], glyph)
        outside = x[i, 0].clone()
        outside[r : r + 8, c : c + 8] = -1
        assert torch.all(outside == -1)  # black everywhere else
        assert int(y[i]) == int(load_digits().target[glyph_index[i % 180]])


def test_offsets_spread_over_the_whole_canvas():
    _, _, offsets = make_canvases("train")
    assert offsets.min() == 0 and offsets.max() == 8
    counts = np.bincount((offsets[:, 0] * 9 + offsets[:, 1]).numpy(), minlength=81)
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()  # all 81 places, near uniform
    # every glyph appears at several places, not at one
    per_glyph = offsets.view(CANVAS_PLACEMENTS, -1, 2)  # canvas i shows glyph i % G
    assert (per_glyph != per_glyph[:1]).any(dim=2).any(dim=0).float().mean() > 0.99


def test_splits_share_no_glyph_and_are_class_balanced():
    train, reference, floor = (set(canvas_glyph_indices(s)) for s in ("train", "reference", "floor"))
    assert len(train) == 1437 and len(reference) == len(floor) == 180
    assert not train & reference and not train & floor and not reference & floor
    for split in ("reference", "floor"):
        counts = torch.bincount(make_canvases(split)[1], minlength=10)
        assert counts.min() >= 17 * CANVAS_PLACEMENTS and counts.max() <= 19 * CANVAS_PLACEMENTS


def test_paste_places_glyphs_at_the_edges():
    glyph = torch.ones(2, 8, 8)
    x = paste(glyph, torch.tensor([[0, 0], [8, 8]]), 16)
    assert x[0, 0, :8, :8].eq(1).all() and x[0, 0, 8:, :].eq(-1).all()
    assert x[1, 0, 8:, 8:].eq(1).all() and x[1, 0, :8, :].eq(-1).all()


def test_digits_canvas_is_a_data_kind_with_splits():
    ds = build_dataset("digits_canvas", conditional=False)
    assert len(ds) == 1437 * CANVAS_PLACEMENTS and ds.num_classes == 0 and ds.resolution == 16
    x, y = ds[5]
    assert x.shape == (1, 16, 16) and int(y) == 0
    ds = build_dataset("digits_canvas", split="floor", channels=3, resolution=24)
    assert len(ds) == 180 * CANVAS_PLACEMENTS and ds.num_classes == 10 and ds[0][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="valid: train, reference, floor"):
        build_dataset("digits_canvas", split="test")
    with pytest.raises(ValueError, match="at least 8"):
        build_dataset("digits_canvas", resolution=6)
    with pytest.raises(ValueError, match="takes no path"):
        build_dataset("digits_canvas", path="somewhere")
