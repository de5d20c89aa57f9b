"""The offline digits metric: real held-out digits score at the floor, broken ones worse, copies show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffit_toolkit.data.digits import digits_held_out_halves, digits_split_indices
from diffit_toolkit.eval.digits import DigitsMetric, _split


@pytest.fixture(scope="module")
def metric():
    return DigitsMetric(seed=0)


@pytest.fixture(scope="module")
def held_out():
    return _split("floor")  # 180 real digits never seen by the classifier nor in the reference


def test_classifier_is_accurate_on_held_out_digits(metric):
    assert metric.test_accuracy() > 0.95


def test_reference_and_floor_are_disjoint_halves_the_judge_never_trained_on(metric):
    reference, floor = digits_held_out_halves()
    assert len(reference) == len(floor) == 180 and not set(reference) & set(floor)
    assert set(reference) | set(floor) == set(digits_split_indices("test"))
    assert not (set(reference) | set(floor)) & set(digits_split_indices("train"))
    assert metric.max_images == 180 and len(metric.test_x) == 180
    for half in (reference, floor):
        counts = np.bincount(_split("all")[1].numpy()[half], minlength=10)
        assert counts.max() - counts.min() <= 2  # each class near 18


def test_real_held_out_digits_score_near_the_floor(metric, held_out):
    x, y = held_out
    some = metric.score(x[:100], y[:100])
    assert some.accuracy > 0.9
    assert some.floor == pytest.approx(metric.floor(100))
    assert some.fd < 2.0 * some.floor  # the floor is real-vs-real at the same n, from another held-out half
    assert 0.8 < some.copy_ratio < 1.25  # held-out digits are as far from the training digits as the floor set


def test_more_images_than_the_floor_set_are_cut_to_a_class_balanced_subset(metric):
    x, y = _split("train")
    score = metric.score(x, y)
    assert score.num_given == len(x) and score.num_images == 180
    assert score.floor == pytest.approx(metric.floor(180))
    # the training digits themselves: a perfect copier, which only the copy check exposes
    assert score.copy_ratio < 0.05
    assert score.fd < 2.0 * score.floor


def test_shuffled_labels_give_chance_accuracy(metric, held_out):
    x, y = held_out
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert metric.score(x, shuffled).accuracy < 0.25


def test_blurred_or_noisy_digits_score_worse(metric, held_out):
    x, y = held_out
    real = metric.score(x, y)
    blurred = metric.score(F.avg_pool2d(x, 3, stride=1, padding=1), y)
    noisy = metric.score((x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1), y)
    for bad in (blurred, noisy):
        assert bad.fd > 3 * real.fd and bad.fd > 3 * real.floor
        assert bad.accuracy < real.accuracy


def test_uint8_nhwc_input_matches_float_input(metric, held_out):
    from diffit_toolkit.inference.writers import to_uint8_nhwc

    x, y = held_out
    a = metric.score(x[:100], y[:100])
    b = metric.score(to_uint8_nhwc(x[:100]), y[:100].numpy())
    assert b.accuracy == pytest.approx(a.accuracy, abs=0.02) and b.fd == pytest.approx(a.fd, rel=0.1, abs=0.5)
    with pytest.raises(ValueError, match="8x8"):
        metric.score(torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="100 images but 99 labels"):
        metric.score(x[:100], y[:99])


@pytest.mark.parametrize("damage", ["zero", "nan", "truncated", "pickled"])
def test_a_damaged_judge_file_is_one_line_not_a_silent_score(tmp_path, damage):
    import pickle

    import torch

    from diffit_toolkit.eval.digits import DigitsClassifier, load_judge

    path = tmp_path / "classifier.pt"
    state = DigitsClassifier().state_dict()
    if damage in ("zero", "nan"):
        torch.save({k: torch.zeros_like(v) if damage == "zero" else torch.full_like(v, float("nan"))
                    for k, v in state.items()}, path)
    elif damage == "truncated":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        marker = tmp_path / "ran"
        path.write_bytes(pickle.dumps(type("X", (), {"__reduce__": lambda self: (marker.touch, ())})()))
    with pytest.raises(ValueError, match=f"judge file {path}"):
        load_judge({}, 0, path, DigitsClassifier, lambda seed: DigitsClassifier())
    if damage == "pickled":
        assert not (tmp_path / "ran").exists()
