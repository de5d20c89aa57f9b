"""The offline digits metric: real digits score at the floor, broken ones worse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffit_toolkit.eval.digits import DigitsMetric, _split


@pytest.fixture(scope="module")
def metric():
    return DigitsMetric(seed=0)


@pytest.fixture(scope="module")
def held_out():
    return _split("test")


def test_classifier_is_accurate_on_held_out_digits(metric):
    assert metric.test_accuracy() > 0.95


def test_real_held_out_digits_score_near_the_floor(metric, held_out):
    x, y = held_out
    half = metric.score(x[::2], y[::2])  # 180 real digits never seen by the classifier
    assert half.accuracy > 0.95
    assert half.fd < 2.0 * half.floor  # the floor is real-vs-real at the same n
    assert half.floor == pytest.approx(metric.floor(180))


def test_shuffled_labels_give_chance_accuracy(metric, held_out):
    x, y = held_out
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert metric.score(x, shuffled).accuracy < 0.25


def test_blurred_or_noisy_digits_score_worse(metric, held_out):
    x, y = held_out
    real = metric.score(x[::2], y[::2])
    blurred = metric.score(F.avg_pool2d(x[::2], 3, stride=1, padding=1), y[::2])
    noisy = metric.score((x[::2] + 0.6 * torch.randn(x[::2].shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1), y[::2])
    for bad in (blurred, noisy):
        assert bad.fd > 3 * real.fd and bad.fd > 3 * real.floor
        assert bad.accuracy < real.accuracy


def test_uint8_nhwc_input_matches_float_input(metric, held_out):
    from diffit_toolkit.generate import to_uint8_nhwc

    x, y = held_out
    a = metric.score(x[:100], y[:100])
    b = metric.score(to_uint8_nhwc(x[:100]), y[:100].numpy())
    assert b.accuracy == pytest.approx(a.accuracy, abs=0.02) and b.fd == pytest.approx(a.fd, rel=0.1, abs=0.5)
    with pytest.raises(ValueError, match="8x8"):
        metric.score(torch.zeros(4, 1, 16, 16))
