"""FID, KID, Inception Score and precision/recall of image sets.

Features come from torch-fidelity's ``inception-v3-compat`` extractor (the TF-compatible
Inception v3 of the FID reference code, with its TF-1.x bilinear resize to 299x299) loaded from a
**local** weights file; nothing is downloaded. The metric math is the one of
[`diffit_toolkit.eval.frechet`][diffit_toolkit.eval.frechet], so any extractor with the same call
signature (the tests use a
small stand-in) goes through the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffit_toolkit.errors import UsageError
from diffit_toolkit.eval.frechet import (
    GaussianStats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from diffit_toolkit.eval.inputs import ImageSet, InputError

#: torch-fidelity's converted TF Inception v3 (pt_inception-2015-12-05), the file to fetch.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
#: Environment variable naming the weights file (instead of ``--inception-weights``).
INCEPTION_WEIGHTS_ENV = "DIFFIT_INCEPTION_WEIGHTS"

#: An extractor maps uint8 (B, 3, H, W) images to (features (B, D), logits (B, K) or None).
Extractor = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]


class MissingWeightsError(UsageError, FileNotFoundError):
    """The Inception weights are not on this machine; the message says what to fetch and where."""


def default_weights_path() -> Path:
    """Where torch-fidelity would cache the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The local Inception weights: ``path``, else ``$DIFFIT_INCEPTION_WEIGHTS``, else the torch hub cache.

    Raises:
        MissingWeightsError: one line naming the file, its URL and where to put it.
    """
    candidate = path or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if candidate:
        if Path(candidate).is_file():
            return Path(candidate)
        raise MissingWeightsError(f"Inception weights not found at {candidate}: download {INCEPTION_WEIGHTS_URL} and pass its path with --inception-weights")
    cached = default_weights_path()
    if cached.is_file():
        return cached
    raise MissingWeightsError(f"no Inception weights (nothing is downloaded): fetch {INCEPTION_WEIGHTS_URL} and pass --inception-weights PATH or put it at {cached}")


def inception_extractor(weights: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
                        progress: Callable[[int, int, str], None] | None = None) -> Extractor:
    """torch-fidelity's ``inception-v3-compat`` (2048-d pool features + unbiased logits) from local weights.

    Args:
        progress: called as ``progress(done, total, "Inception features")`` after every batch.
    """
    path = find_inception_weights(weights)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path)).to(device)
    except Exception as exc:  # a corrupt or wrong file
        raise MissingWeightsError(f"{path} is not the Inception weights file {INCEPTION_WEIGHTS_FILE} ({str(exc).splitlines()[0][:120]})") from None

    @torch.no_grad()
    def extract(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        feats, logits = [], []
        for start in range(0, len(images), batch_size):
            f, lg = net(images[start : start + batch_size].to(device))
            feats.append(f.double().cpu().numpy())
            logits.append(lg.double().cpu().numpy())
            if progress is not None:
                progress(min(start + batch_size, len(images)), len(images), "Inception features")
        return np.concatenate(feats), np.concatenate(logits)

    return extract


def evaluate_sets(samples: ImageSet, ref: ImageSet | None, extractor: Extractor, *, fid: bool = True, kid: bool = True,
                  isc: bool = True, prc: bool = True, kid_subset_size: int = 1000, prc_k: int = 3) -> dict[str, float]:
    """FID / KID / IS / precision-recall of ``samples`` against ``ref`` in ``extractor``'s feature space.

    FID uses the reference's stored ``mu``/``sigma`` when it has them (an ADM reference batch),
    otherwise the reference images. KID and precision/recall need reference images and are left out
    for a statistics-only reference; IS needs logits and no reference.

    Returns:
        dict with ``fid``, ``kid_mean``/``kid_std``, ``is_mean``/``is_std``, ``precision``/``recall``
        (what could be computed) and ``num_samples``.
    """
    if samples.images is None:
        raise InputError(f"{samples.source}: holds statistics only; the samples must be images")
    if len(samples) < 2:
        raise InputError(f"{samples.source}: need at least 2 sample images")
    if ref is not None and ref.images is not None and samples.size != ref.size:
        raise InputError(f"image sizes differ: samples {samples.size[0]}x{samples.size[1]} vs reference {ref.size[0]}x{ref.size[1]}; resize one of them")
    feats, logits = extractor(samples.images)
    out: dict[str, float] = {"num_samples": float(len(samples))}
    ref_feats = None
    if ref is not None and ref.images is not None and (kid or prc or (fid and ref.stats is None)):
        ref_feats, _ = extractor(ref.images)
    if fid and ref is not None:
        stats = ref.stats if ref.stats is not None else GaussianStats.of(ref_feats)
        if stats.mu.shape[0] != feats.shape[1]:
            raise InputError(f"{ref.source}: stored mu has {stats.mu.shape[0]} dimensions, the extractor gives {feats.shape[1]}")
        out["fid"] = frechet_distance(GaussianStats.of(feats), stats)
    if kid and ref_feats is not None:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(feats, ref_feats, subset_size=kid_subset_size)
    if prc and ref_feats is not None:
        out["precision"], out["recall"] = precision_recall(ref_feats, feats, k=prc_k)
    if isc and logits is not None:
        out["is_mean"], out["is_std"] = inception_score(logits)
    return out
