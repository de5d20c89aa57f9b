"""Metric math against closed forms, and the FID pipeline with a stand-in feature extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.eval.frechet import (
    GaussianStats,
    fd_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)
from diffit_toolkit.eval.inputs import ImageSet
from diffit_toolkit.eval.metrics import evaluate_sets


def test_frechet_distance_closed_form_gaussians():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # shared eigenbasis: the matrix square root is exact
    l1, l2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 1.0, 0.5, 0.25])
    a = GaussianStats(np.array([0.0, 1.0, 2.0, 3.0]), q @ np.diag(l1) @ q.T)
    b = GaussianStats(np.array([1.0, 1.0, 0.0, 3.0]), q @ np.diag(l2) @ q.T)
    expected = 1 + 4 + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(a, GaussianStats(np.zeros(3), np.eye(3)))


def test_frechet_distance_of_sampled_gaussians_converges():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(20000, 2))
    y = rng.normal([1.0, 0.0], [2.0, 1.0], size=(20000, 2))
    assert fd_from_features(x, y) == pytest.approx(1 + (2 - 1) ** 2, abs=0.1)


def _poly_moments(m: float, s: float) -> np.ndarray:
    return np.array([m, m * m + s * s, m**3 + 3 * m * s * s])


def test_kid_unbiased_mmd_matches_closed_form_1d_gaussians():
    # 1-D cubic kernel (xy + 1)^3 = x^3y^3 + 3x^2y^2 + 3xy + 1, so for independent draws
    # MMD^2 = sum_j c_j (E x^j - E y^j)^2 with c = (3, 3, 1) for j = 1, 2, 3.
    (m1, s1), (m2, s2) = (0.0, 1.0), (0.5, 1.2)
    c = np.array([3.0, 3.0, 1.0])
    expected = float(np.sum(c * (_poly_moments(m1, s1) - _poly_moments(m2, s2)) ** 2))
    rng = np.random.default_rng(0)
    values = [mmd2_unbiased(rng.normal(m1, s1, (1000, 1)), rng.normal(m2, s2, (1000, 1))) for _ in range(30)]
    assert np.mean(values) == pytest.approx(expected, rel=0.1)
    same = [mmd2_unbiased(rng.normal(0, 1, (500, 1)), rng.normal(0, 1, (500, 1))) for _ in range(20)]
    assert abs(np.mean(same)) < 0.05 * expected  # unbiased: ~0 for equal distributions
    kid, kid_std = kernel_inception_distance(rng.normal(m1, s1, (20000, 1)), rng.normal(m2, s2, (20000, 1)),
                                             subsets=30, subset_size=1000)
    assert kid == pytest.approx(expected, rel=0.25) and kid_std > 0


def test_inception_score_extremes_and_precision_recall():
    k = 10
    confident = np.full((1000, k), -50.0)
    confident[np.arange(1000), np.arange(1000) % k] = 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(k, rel=1e-6)
    assert 8 < inception_score(confident, splits=10)[0] <= k
    assert inception_score(np.zeros((100, k)), splits=5)[0] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # samples covering only part of the real support: high precision, lower recall
    p, r = precision_recall(real, real[real[:, 0] > 0.5] * 1.0)
    assert p == 1.0 and r < 0.6


def _stand_in_extractor():
    """A fixed random conv net in place of Inception (its weights are never downloadable here)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 64, 24), torch.nn.Tanh(), torch.nn.Linear(24, 12)).eval()

    @torch.no_grad()
    def extract(images):
        x = images.float() / 127.5 - 1
        logits = net(x).double().numpy()
        return logits, logits[:, :10]

    return extract


def _digits_uint8(split: str) -> torch.Tensor:
    from sklearn.datasets import load_digits

    from diffit_toolkit.data import digits_split_indices

    d = load_digits().images[digits_split_indices(split)]
    x = torch.from_numpy(np.round(d / 16 * 255).astype(np.uint8))[:, None]
    return x.expand(-1, 3, -1, -1).contiguous()


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    extract = _stand_in_extractor()
    real = _digits_uint8("test")
    ref = ImageSet("real", real)
    assert evaluate_sets(ImageSet("same", real.clone()), ref, extract)["fid"] == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (10.0, 40.0, 100.0):
        noisy = (real.float() + sigma * torch.randn(real.shape, generator=gen)).clamp(0, 255).round().to(torch.uint8)
        fids.append(evaluate_sets(ImageSet("noisy", noisy), ref, extract)["fid"])
    assert 0 < fids[0] < fids[1] < fids[2]
    out = evaluate_sets(ImageSet("same", real.clone()), ref, extract, kid_subset_size=100)
    assert set(out) >= {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_fid_from_stored_reference_statistics_equals_fid_from_images():
    extract = _stand_in_extractor()
    real, train = _digits_uint8("test"), _digits_uint8("train")[:300]
    feats, _ = extract(real)
    stats_only = ImageSet("ref.npz", None, None, GaussianStats.of(feats))
    from_stats = evaluate_sets(ImageSet("s", train), stats_only, extract)
    from_images = evaluate_sets(ImageSet("s", train), ImageSet("r", real), extract)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert "kid_mean" not in from_stats and "precision" not in from_stats  # need reference images
