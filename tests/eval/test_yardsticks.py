"""The shared yardsticks of the offline judges: class-balanced subsets and the copy check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.eval.yardsticks import JudgeScore, balanced_subset, nearest_distances


def test_balanced_subset_gives_every_class_an_equal_share_and_is_seeded():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])  # unbalanced input, sorted by class
    idx = balanced_subset(40, len(labels), labels, seed=0)
    assert len(idx) == 40 and len(set(idx)) == 40 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=4).tolist() == [10, 10, 10, 10]
    assert np.array_equal(idx, balanced_subset(40, len(labels), labels, seed=0))
    assert not np.array_equal(idx, balanced_subset(40, len(labels), labels, seed=1))
    # a class with too few items gives its share to the others; uneven sizes differ by at most one
    counts = np.bincount(labels[balanced_subset(110, len(labels), labels, seed=0)], minlength=4)
    assert counts.tolist() == [30, 30, 30, 20]
    counts = np.bincount(labels[balanced_subset(42, len(labels), labels, seed=3)], minlength=4)
    assert counts.sum() == 42 and counts.max() - counts.min() == 1


def test_balanced_subset_without_labels_or_when_nothing_is_cut():
    idx = balanced_subset(5, 20, None, seed=0)
    assert len(set(idx)) == 5 and idx.max() < 20
    assert balanced_subset(30, 20, None, seed=0).tolist() == list(range(20))


def test_nearest_distances_finds_copies():
    train = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    copies = train[[3, 7]]
    assert np.allclose(nearest_distances(copies, train), 0, atol=1e-5)
    shifted = copies + 0.5
    assert np.allclose(nearest_distances(shifted[:1], train[3:4]), 0.5 * 4, atol=1e-5)  # sqrt(16 * 0.25)


def test_score_line_names_the_subset_and_the_copy_ratio():
    line = JudgeScore(0.5, 2.0, 1.0, 100, copy_ratio=0.97, num_given=400).line()
    assert "FD/floor 2.00" in line and "n=100 of 400, class-balanced" in line and "copy ratio 0.97" in line
    assert "accuracy n/a" in JudgeScore(float("nan"), 2.0, 1.0, 100, 1.0, 100).line()
    with pytest.raises(TypeError):
        JudgeScore(0.5, 2.0)  # the fields without defaults are required
