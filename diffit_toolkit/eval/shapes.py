"""The offline judge of the embedded shapes: a small CNN trained on the generator's own images.

Like the digits metric ([`diffit_toolkit.eval.digits`][diffit_toolkit.eval.digits]) and nothing
downloaded: for conditional
samples it reports (a) the share classified as their requested class and (b) the Frechet distance
in the classifier's penultimate feature space against the held-out shapes (``split="test"``, a
disjoint random stream), next to the real-vs-real floor: the same distance for as many real train
images as there are samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffit_toolkit.eval.digits import JudgeScore, accuracy_and_fd, batch_as_float, load_judge
from diffit_toolkit.eval.frechet import fd_from_features

#: Feature size of the classifier's penultimate layer.
FEATURE_DIM = 64
#: Training epochs of the judge (about two minutes on one CPU core).
JUDGE_EPOCHS = 10


class ShapesClassifier(nn.Module):
    """Three conv + batch-norm stages on 3x32x32 images in [-1, 1]; ``features`` is its 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            *stage(3, 24),   # (B, 24, 16, 16)
            *stage(24, 48),  # (B, 48, 8, 8)
            *stage(48, 64),  # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_shapes_classifier(seed: int = 0, epochs: int = JUDGE_EPOCHS, num: int | None = None,
                            batch: int = 128) -> ShapesClassifier:
    """Train the judge on the shapes train split (seeded; the first ``num`` images, default all)."""
    from diffit_toolkit.data.shapes import make_shapes

    x, y = make_shapes("train", num=num)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(x) // batch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb = x[idx]
            # light pixel noise makes it a little more robust to sample artefacts
            xb = xb + 0.05 * torch.randn(xb.shape, generator=gen)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


_MEMO: dict[int, ShapesClassifier] = {}


def load_shapes_classifier(seed: int = 0, cache: str | Path | None = None) -> ShapesClassifier:
    """The judge for ``seed``: memoised in the process and, with ``cache``, kept in that file."""
    return load_judge(_MEMO, seed, cache, ShapesClassifier, train_shapes_classifier)


class ShapesScore(JudgeScore):
    """Result of [`ShapesMetric.score`][diffit_toolkit.eval.shapes.ShapesMetric.score] (fields as
    [`JudgeScore`][diffit_toolkit.eval.digits.JudgeScore])."""

    name = "shapes"


def to_shapes_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Samples as float (B, 3, 32, 32) in [-1, 1]: accepts float [-1, 1] NCHW or uint8 NHWC/NCHW."""
    x = batch_as_float(images, channels=(3,))
    if tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"the shapes metric takes 32x32 RGB images, got {tuple(x.shape[1:])}")
    return x


class ShapesMetric:
    """Accuracy and Frechet distance of shape samples in the feature space of
    [`ShapesClassifier`][diffit_toolkit.eval.shapes.ShapesClassifier].

    Args:
        seed: Judge training seed.
        cache: Optional file where the trained judge is kept.
        classifier: Use this classifier instead of training one (tests).
    """

    def __init__(self, seed: int = 0, cache: str | Path | None = None, classifier: ShapesClassifier | None = None,
                 num_test: int | None = None) -> None:
        from diffit_toolkit.data.shapes import make_shapes

        self.classifier = classifier if classifier is not None else load_shapes_classifier(seed, cache)
        self.seed = seed
        self.test_x, self.test_y = make_shapes("test", num=num_test)
        self.test_features = self.features(self.test_x)
        self._floors: dict[int, float] = {}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        x = to_shapes_tensor(x)
        return np.concatenate([self.classifier.features(x[i : i + 500]).double().numpy() for i in range(0, len(x), 500)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        x = to_shapes_tensor(x)
        return torch.cat([self.classifier(x[i : i + 500]).argmax(dim=1) for i in range(0, len(x), 500)])

    def test_accuracy(self) -> float:
        """Accuracy of the judge on the held-out real shapes."""
        return float((self.predict(self.test_x) == self.test_y).float().mean())

    def floor(self, n: int) -> float:
        """FD of ``n`` real train shapes (the first ``n`` of the train split) against the held-out ones."""
        from diffit_toolkit.data.shapes import make_shapes

        if n not in self._floors:
            self._floors[n] = fd_from_features(self.features(make_shapes("train", num=n)[0]), self.test_features)
        return self._floors[n]

    def score(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> ShapesScore:
        """Score samples (float [-1, 1] NCHW or uint8 NHWC as in an ADM ``.npz``) with their requested labels."""
        x = to_shapes_tensor(images)
        accuracy, fd = accuracy_and_fd(x, labels, self.predict, self.features, self.test_features, "shapes")
        return ShapesScore(accuracy, fd, self.floor(len(x)), len(x))
