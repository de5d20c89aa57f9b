"""Evaluation: FID/KID/IS/precision-recall (Inception via torch-fidelity, local weights only), the
offline digits metric, and the mechanism ablation runner."""

from diffit_toolkit.eval.digits import DigitsClassifier, DigitsMetric, DigitsScore, load_digits_classifier
from diffit_toolkit.eval.frechet import (
    GaussianStats,
    fd_from_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)

__all__ = [
    "DigitsClassifier",
    "DigitsMetric",
    "DigitsScore",
    "GaussianStats",
    "fd_from_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_digits_classifier",
    "mmd2_unbiased",
    "precision_recall",
]
