"""The embedded digits: shapes, range, labels, the fixed held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.data import DigitsDataset, build_dataset, digits_split_indices


def test_default_digits_are_train_split_1x8x8_in_range_with_10_classes():
    data = build_dataset()
    x, y = data[0]
    assert (data.num_classes, data.channels, data.resolution) == (10, 1, 8)
    assert data.class_names == [str(i) for i in range(10)]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0
    assert data.images.min() == -1 and data.images.max() == 1  # 0 and 16 both occur
    assert set(data.labels.tolist()) == set(range(10))


def test_split_is_disjoint_complete_stratified_and_fixed():
    train, test, full = (digits_split_indices(s) for s in ("train", "test", "all"))
    assert len(full) == 1797 and len(test) == 360  # ceil(0.2 * 1797), as scikit-learn rounds
    assert not set(train) & set(test) and np.array_equal(np.sort(np.concatenate([train, test])), full)
    labels = DigitsDataset(split="test").labels
    assert torch.bincount(labels, minlength=10).min() >= 30  # every class held out (about 36 each)
    assert np.array_equal(digits_split_indices("test"), test)  # deterministic
    assert len(DigitsDataset(split="all")) == 1797


def test_upsampled_rgb_unconditional_flipped():
    data = build_dataset("digits", resolution=16, channels=3, conditional=False, split="all")
    x, y = data[5]
    assert x.shape == (3, 16, 16) and y.item() == 0 and data.num_classes == 0
    assert torch.equal(x[0], x[2]) and x.min() >= -1 and x.max() <= 1
    native = DigitsDataset(split="all")[5][0]
    near = DigitsDataset(split="all", resolution=16, interpolation="nearest")[5][0]
    assert torch.equal(near[0, ::2, ::2], native[0])  # nearest 2x keeps the pixel values
    flipping = DigitsDataset(split="all", hflip=True)
    seen = {tuple(flipping[5][0].flatten().tolist()) for _ in range(40)}
    assert seen == {tuple(native.flatten().tolist()), tuple(native.flip(-1).flatten().tolist())}


def test_unknown_split_is_one_line_error():
    with pytest.raises(ValueError, match="unknown digits split 'val'") as info:
        build_dataset("digits", split="val")
    assert "\n" not in str(info.value)
