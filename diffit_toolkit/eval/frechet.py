"""Metric math shared by every feature space: Frechet distance, KID, Inception Score, precision/recall.

Implemented once here (float64 NumPy / SciPy) and used with Inception features, the digits
classifier's features and the small stand-in extractors of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (what an ADM reference batch stores as ``mu``/``sigma``)."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStats:
        """Statistics of ``features`` (N, D) with the unbiased covariance (as pytorch-fid / ADM)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False))


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Frechet distance ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two Gaussians.

    ``tr (S_a S_b)^(1/2)`` is computed as ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))`` with two symmetric
    eigendecompositions: exact for any PSD pair (singular ones included) and seconds instead of a
    minute for 2048-d Inception statistics (a general ``sqrtm`` of ``S_a S_b``).

    Args:
        a: First statistics.
        b: Second statistics.
    """
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    w, v = linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    ev = linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    value = float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(value, 0.0)


def fd_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(GaussianStats.of(f1), GaussianStats.of(f2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """The KID kernel ``(x.y / d + coef0) ** degree``."""
    base = x @ y.T / x.shape[1] + coef0
    out = base.copy()
    for _ in range(degree - 1):  # repeated products: much faster than a float power
        out *= base
    return out


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased estimate of the squared MMD with the cubic polynomial kernel (one subset)."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x, degree, coef0), polynomial_kernel(y, y, degree, coef0), polynomial_kernel(x, y, degree, coef0)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al.): mean and std of the unbiased MMD^2 over random subsets.

    Args:
        f1: Features (N1, D).
        f2: Features (N2, D).
        subsets: Number of random subsets.
        subset_size: Size of each subset (capped at the smaller set).
        seed: Seed of the subset draws.
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), size, replace=False)], f2[rng.choice(len(f2), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score ``exp(E KL(p(y|x) || p(y)))`` (mean and std over ``splits``) from classifier logits."""
    logits = np.asarray(logits, np.float64)
    rng = np.random.default_rng(seed)
    logits = logits[rng.permutation(len(logits))]
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    p = np.exp(logp)
    scores = []
    for part_logp, part_p in zip(np.array_split(logp, splits), np.array_split(p, splits)):
        if not len(part_p):
            continue
        log_marginal = np.log(part_p.mean(axis=0) + 1e-12)
        kl = (part_p * (part_logp - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(f: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(np.maximum(_sqdist(f, f), 0))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.) with k-NN balls in feature space.

    Precision: share of ``fake`` inside some real sample's k-NN ball; recall: share of ``real``
    inside some fake sample's ball.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall needs more than k={k} features in each set")
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = np.sqrt(np.maximum(_sqdist(fake, real), 0))  # (fake, real)
    precision = float((d <= r_real[None, :]).any(axis=1).mean())
    recall = float((d.T <= r_fake[None, :]).any(axis=1).mean())
    return precision, recall
