"""The offline metric of the embedded digits: a small classifier trained on the real train split.

Nothing is downloaded. For conditional samples it reports (a) the accuracy with which they are
classified as their requested class and (b) the Frechet distance in the classifier's penultimate
feature space against the held-out real digits (``split="test"``), next to the real-vs-real floor:
the same distance for as many *real* train digits as there are samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from diffit_toolkit.eval.frechet import fd_from_features

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
    from diffit_toolkit.data import build_dataset

    ds = build_dataset("digits", split=split)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs).float(), torch.as_tensor(np.array([int(y) for y in ys]))


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
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
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


def accuracy_and_fd(x: torch.Tensor, labels, predict: Callable[[torch.Tensor], torch.Tensor],
                    features: Callable[[torch.Tensor], np.ndarray], test_features: np.ndarray, what: str) -> tuple[float, float]:
    """Share of samples ``x`` classified as their requested ``labels`` (``nan`` without labels) and
    the Frechet distance of their features to ``test_features``; one-line errors name ``what``."""
    if len(x) < 2:
        raise ValueError(f"the {what} metric needs at least 2 images")
    accuracy = float("nan")
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        if len(y) != len(x):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        accuracy = float((predict(x) == y).float().mean())
    return accuracy, fd_from_features(features(x), test_features)


@dataclass(frozen=True)
class JudgeScore:
    """Result of an offline judge's ``score``.

    Attributes:
        accuracy: share of samples classified as their requested class (``nan`` without labels).
        fd: Frechet distance to the held-out real images in the classifier's feature space.
        floor: the same distance for as many real (train) images: the best a generator can expect.
        num_images: number of samples scored.
    """

    accuracy: float
    fd: float
    floor: float
    num_images: int
    #: The judge's name at the start of `line`.
    name: ClassVar[str] = "judge"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def line(self) -> str:
        acc = "n/a" if np.isnan(self.accuracy) else f"{100 * self.accuracy:.1f}%"
        return f"{self.name}: accuracy {acc}  FD {self.fd:.3f}  (real-vs-real floor {self.floor:.3f}, n={self.num_images})"


class DigitsScore(JudgeScore):
    """Result of [`DigitsMetric.score`][diffit_toolkit.eval.digits.DigitsMetric.score] (fields as
    [`JudgeScore`][diffit_toolkit.eval.digits.JudgeScore])."""

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


class DigitsMetric:
    """Accuracy and Frechet distance of digit samples in the feature space of
    [`DigitsClassifier`][diffit_toolkit.eval.digits.DigitsClassifier].

    Args:
        seed: Classifier training seed.
        cache: Optional file where the trained classifier is kept.
    """

    def __init__(self, seed: int = 0, cache: str | Path | None = None) -> None:
        self.classifier = load_digits_classifier(seed, cache)
        self.seed = seed
        self.test_x, self.test_y = _split("test")
        self.train_x, _ = _split("train")
        self.test_features = self.features(self.test_x)
        self._train_features = self.features(self.train_x)
        self._floors: dict[int, float] = {}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.features(to_digits_tensor(x)).double().numpy()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(to_digits_tensor(x)).argmax(dim=1)

    def test_accuracy(self) -> float:
        """Accuracy of the classifier on the held-out real digits."""
        return float((self.predict(self.test_x) == self.test_y).float().mean())

    def floor(self, n: int) -> float:
        """FD of ``n`` real train digits (a fixed draw) against the held-out ones."""
        n = min(n, len(self._train_features))
        if n not in self._floors:
            idx = np.random.default_rng(self.seed).choice(len(self._train_features), n, replace=False)
            self._floors[n] = fd_from_features(self._train_features[idx], self.test_features)
        return self._floors[n]

    def score(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> DigitsScore:
        """Score samples (float [-1, 1] NCHW or uint8 NHWC as in an ADM ``.npz``) with their requested labels."""
        x = to_digits_tensor(images)
        accuracy, fd = accuracy_and_fd(x, labels, self.predict, self.features, self.test_features, "digits")
        return DigitsScore(accuracy, fd, self.floor(len(x)), len(x))
