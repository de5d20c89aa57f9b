"""The offline judge of the embedded shapes: a small CNN trained on the generator's own images.

Like the digits metric ([`diffit_toolkit.eval.digits`][diffit_toolkit.eval.digits]) and nothing
downloaded: for conditional samples it reports (a) the share classified as their requested class,
(b) the Frechet distance in the classifier's penultimate feature space against the held-out
shapes (``split="test"``, a disjoint random stream), next to the real-vs-real floor: the same
distance for as many images of a third stream (``split="floor"``) that the judge never trained
on either, and (c) the copy check against the train split (see
[`diffit_toolkit.eval.yardsticks`][diffit_toolkit.eval.yardsticks]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffit_toolkit.eval.digits import batch_as_float, load_judge
from diffit_toolkit.eval.yardsticks import HeldOutJudge, JudgeScore

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
    [`JudgeScore`][diffit_toolkit.eval.yardsticks.JudgeScore])."""

    name = "shapes"


def to_shapes_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Samples as float (B, 3, 32, 32) in [-1, 1]: accepts float [-1, 1] NCHW or uint8 NHWC/NCHW."""
    x = batch_as_float(images, channels=(3,))
    if tuple(x.shape[1:]) != (3, 32, 32):
        raise ValueError(f"the shapes metric takes 32x32 RGB images, got {tuple(x.shape[1:])}")
    return x


class ShapesMetric(HeldOutJudge):
    """Accuracy and Frechet distance of shape samples in the feature space of
    [`ShapesClassifier`][diffit_toolkit.eval.shapes.ShapesClassifier], with the fair floor and the
    copy check of [`HeldOutJudge`][diffit_toolkit.eval.yardsticks.HeldOutJudge].

    Args:
        seed: Judge training seed (and seed of the random subsets).
        cache: Optional file where the trained judge is kept.
        classifier: Use this classifier instead of training one (tests).
        num_test: Images of the reference and of the floor set (default: 2000 each); at most
            this many samples are scored.
        num_train: Training images the copy check searches (default: the whole train split).
    """

    what = "shapes"
    score_class = ShapesScore

    def __init__(self, seed: int = 0, cache: str | Path | None = None, classifier: ShapesClassifier | None = None,
                 num_test: int | None = None, num_train: int | None = None) -> None:
        from diffit_toolkit.data.shapes import make_shapes

        super().__init__(classifier if classifier is not None else load_shapes_classifier(seed, cache),
                         reference=make_shapes("test", num=num_test), floor=make_shapes("floor", num=num_test),
                         train=make_shapes("train", num=num_train)[0], seed=seed)

    def to_tensor(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return to_shapes_tensor(images)
