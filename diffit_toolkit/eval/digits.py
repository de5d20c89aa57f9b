"""The offline metric of the embedded digits: a small classifier trained on the real train split.

Nothing is downloaded. For conditional samples it reports (a) the accuracy with which they are
classified as their requested class, (b) the Frechet distance in the classifier's penultimate
feature space against one half of the held-out digits (the *reference*, 180 digits), next to the
real-vs-real floor: the same distance for as many digits of the *other* held-out half (neither
half trains the classifier), and (c) the copy check (see
[`diffit_toolkit.eval.yardsticks`][diffit_toolkit.eval.yardsticks]). At most 180 samples are
scored: more are cut to a class-balanced random subset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffit_toolkit.eval.yardsticks import HeldOutJudge, JudgeScore, accuracy_and_fd

__all__ = ["DigitsClassifier", "DigitsMetric", "DigitsScore", "JudgeScore", "accuracy_and_fd", "batch_as_float",
           "load_digits_classifier", "load_judge", "to_digits_tensor", "train_digits_classifier"]

#: Feature size of the classifier's penultimate layer.
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """A small MLP on 1x8x8 digits in [-1, 1]; ``features`` is its 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.ReLU(),
            nn.Linear(256, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 8, 8), labels)`` of a digits split: ``train``, ``test``, or a held-out half
    (``reference`` or ``floor``, see [`digits_held_out_halves`][diffit_toolkit.data.digits.digits_held_out_halves])."""
    from diffit_toolkit.data import build_dataset
    from diffit_toolkit.data.digits import digits_held_out_halves

    if split in ("reference", "floor"):
        ds = build_dataset("digits", split="all")
        keep = digits_held_out_halves()[split == "floor"]
        return ds.images[keep].float(), ds.labels[keep]
    ds = build_dataset("digits", split=split)
    return ds.images.float(), ds.labels


def train_digits_classifier(seed: int = 0, epochs: int = 30) -> DigitsClassifier:
    """Train the classifier on the digits train split (seeded; a few seconds on one CPU core)."""
    x, y = _split("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two contended ones
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // 64))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            xb = x[idx]
            # light pixel noise makes it a little more robust to sample artefacts
            xb = xb + 0.1 * torch.randn(xb.shape, generator=gen)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_num_threads(threads)
    return model.eval()


_MEMO: dict[int, DigitsClassifier] = {}


def load_judge(memo: dict[int, nn.Module], seed: int, cache: str | Path | None,
               make: Callable[[], nn.Module], train: Callable[[int], nn.Module]) -> nn.Module:
    """An offline judge for ``seed``: memoised in ``memo`` and, with ``cache``, kept in that file
    (``make()`` builds an untrained one to load into, ``train(seed)`` trains one)."""
    if seed in memo:
        return memo[seed]
    model = None
    if cache is not None and Path(cache).is_file():
        model = make()
        try:  # weights_only: a pickled payload is refused, never run
            model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        except Exception as exc:  # truncated, pickled code, another judge's keys
            raise ValueError(f"judge file {cache} cannot be read ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:120]}); delete it and the judge is trained again") from None
        degenerate = [name for name, p in model.named_parameters()
                      if not torch.isfinite(p).all() or (p.dim() >= 2 and not p.any())]
        if degenerate:  # an all-zero or non-finite layer scores every sample set alike (FD 0 for all)
            raise ValueError(f"judge file {cache} is damaged: {degenerate[0]} is all zero or not finite; "
                             f"delete it and the judge is trained again")
        model.eval()
    if model is None:
        model = train(seed)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), cache)
    memo[seed] = model
    return model


def load_digits_classifier(seed: int = 0, cache: str | Path | None = None) -> DigitsClassifier:
    """The classifier for ``seed``: memoised in the process and, with ``cache``, saved to that file."""
    return load_judge(_MEMO, seed, cache, DigitsClassifier, train_digits_classifier)


class DigitsScore(JudgeScore):
    """Result of [`DigitsMetric.score`][diffit_toolkit.eval.digits.DigitsMetric.score] (fields as
    [`JudgeScore`][diffit_toolkit.eval.yardsticks.JudgeScore])."""

    name = "digits"


def batch_as_float(images: torch.Tensor | np.ndarray, channels: tuple[int, ...]) -> torch.Tensor:
    """A batch of samples as float NCHW in [-1, 1]: float NCHW as it is, uint8 NHWC or NCHW (with
    one of ``channels`` channels) scaled from [0, 255]."""
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if x.dim() != 4:
        raise ValueError(f"expected a batch of images (4 dims), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] in channels and x.shape[1] not in channels:
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 127.5 - 1
    return x.float()


def to_digits_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Samples as float (B, 1, 8, 8) in [-1, 1]: accepts float [-1, 1] NCHW or uint8 NHWC/NCHW (RGB averaged)."""
    x = batch_as_float(images, channels=(1, 3))
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"the digits metric takes 8x8 gray (or gray-as-RGB) images, got {tuple(x.shape[1:])}")
    return x


class DigitsMetric(HeldOutJudge):
    """Accuracy and Frechet distance of digit samples in the feature space of
    [`DigitsClassifier`][diffit_toolkit.eval.digits.DigitsClassifier], with the fair floor and the
    copy check of [`HeldOutJudge`][diffit_toolkit.eval.yardsticks.HeldOutJudge].

    The classifier trains on the digits' train split (the generator's training digits); the
    reference and floor sets are the two halves of the held-out test split (180 digits each), so
    at most 180 samples are scored.

    Args:
        seed: Classifier training seed (and seed of the random subsets).
        cache: Optional file where the trained classifier is kept.
    """

    what = "digits"
    score_class = DigitsScore

    def __init__(self, seed: int = 0, cache: str | Path | None = None) -> None:
        super().__init__(load_digits_classifier(seed, cache), reference=_split("reference"), floor=_split("floor"),
                         train=_split("train")[0], seed=seed)

    def to_tensor(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return to_digits_tensor(images)
