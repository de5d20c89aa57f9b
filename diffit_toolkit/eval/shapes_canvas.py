"""The offline judge of the shapes canvas: a small CNN that reads which shape is where, and how big.

Nothing is downloaded. The judge has the architecture of the digits-canvas judge
([`CanvasClassifier`][diffit_toolkit.eval.canvas.CanvasClassifier]) and is trained on the
generator's own training split to name the shape *and* to regress its centre and radius, so its
64-d penultimate features encode what is drawn, where and how large: a generator that puts its
shapes in the wrong places, only in some, or at the wrong sizes, scores a worse Frechet distance
even when each outline is clean. Like the digits-canvas judge it is trained to look past
pixel-level nuisance (Gaussian pixel noise and a few stray pixels on every training canvas).

Samples are compared with the ``reference`` split; the real-vs-real floor is the same distance for
as many images of the ``floor`` split. Both are random streams the judge and the generator never
see (see [`diffit_toolkit.data.shapes_canvas`][diffit_toolkit.data.shapes_canvas] and
[`diffit_toolkit.eval.yardsticks`][diffit_toolkit.eval.yardsticks]); at most 1440 samples are
scored. The copy check searches the 20 000 training images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffit_toolkit.data.shapes_canvas import RADIUS_RANGE, SHAPES_CANVAS_CLASSES, SHAPES_CANVAS_RESOLUTION, make_shapes_canvas
from diffit_toolkit.eval.canvas import CanvasClassifier, fit_canvas_judge, to_canvas_tensor
from diffit_toolkit.eval.digits import load_judge
from diffit_toolkit.eval.yardsticks import HeldOutJudge, JudgeScore

#: Training epochs of the judge over the 20 000 training images (about 30 CPU-seconds on one thread).
JUDGE_EPOCHS = 6
#: Weight of the geometry regression beside the class cross-entropy.
GEOMETRY_WEIGHT = 5.0
#: Name of the judge's cache file; it changes whenever the judge's training changes.
JUDGE_FILE = "shapes_canvas_judge_v1.pt"


def geometry_scale() -> torch.Tensor:
    """Divisors that bring (row, column, radius) to about [0, 1] for the regression head."""
    return torch.tensor([SHAPES_CANVAS_RESOLUTION, SHAPES_CANVAS_RESOLUTION, RADIUS_RANGE[1]])


def make_classifier() -> CanvasClassifier:
    return CanvasClassifier(num_classes=len(SHAPES_CANVAS_CLASSES), num_targets=3)


def train_shapes_canvas_classifier(seed: int = 0, epochs: int = JUDGE_EPOCHS, num: int | None = None,
                                   batch: int = 128) -> CanvasClassifier:
    """Train the judge on the train split with pixel nuisance (seeded; the first ``num`` images,
    default all)."""
    images, labels, geometry = (t[:num] for t in make_shapes_canvas("train"))
    targets = geometry / geometry_scale()
    return fit_canvas_judge(make_classifier, len(images), lambda idx, gen: (images[idx], labels[idx], targets[idx]),
                            seed, epochs, batch, GEOMETRY_WEIGHT)


_MEMO: dict[int, CanvasClassifier] = {}


def load_shapes_canvas_classifier(seed: int = 0, cache: str | Path | None = None) -> CanvasClassifier:
    """The judge for ``seed``: memoised in the process and, with ``cache``, kept in that file."""
    return load_judge(_MEMO, seed, cache, make_classifier, train_shapes_canvas_classifier)


class ShapesCanvasScore(JudgeScore):
    """Result of [`ShapesCanvasMetric.score`][diffit_toolkit.eval.shapes_canvas.ShapesCanvasMetric.score]
    (fields as [`JudgeScore`][diffit_toolkit.eval.yardsticks.JudgeScore])."""

    name = "shapes_canvas"


class ShapesCanvasMetric(HeldOutJudge):
    """Frechet distance (and, with labels, class accuracy) of shapes-canvas samples in the judge's
    feature space, with the fair floor and the copy check of
    [`HeldOutJudge`][diffit_toolkit.eval.yardsticks.HeldOutJudge].

    Args:
        seed: Judge training seed (and seed of the random subsets).
        cache: Optional file where the trained judge is kept.
        classifier: Use this classifier instead of training one (tests).
    """

    what = "shapes_canvas"
    score_class = ShapesCanvasScore

    def __init__(self, seed: int = 0, cache: str | Path | None = None,
                 classifier: CanvasClassifier | None = None) -> None:
        reference, floor, train = (make_shapes_canvas(split) for split in ("reference", "floor", "train"))
        super().__init__(classifier if classifier is not None else load_shapes_canvas_classifier(seed, cache),
                         reference=reference[:2], floor=floor[:2], train=train[0], seed=seed)
        self._held_out_geometry = torch.cat([reference[2], floor[2]])

    def to_tensor(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return to_canvas_tensor(images, "shapes_canvas")

    @torch.no_grad()
    def geometry(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The judge's reading of each shape: (B, 3) centre (row, column) and radius in pixels."""
        x = self.to_tensor(x)
        return torch.cat([self.classifier.offset(x[i : i + 500]) for i in range(0, len(x), 500)]) * geometry_scale()

    def geometry_error(self) -> torch.Tensor:
        """Mean absolute error (pixels) of the judge's (row, column, radius) reading on the held-out images."""
        held_out = torch.cat([self.test_x, self.floor_x])
        return (self.geometry(held_out) - self._held_out_geometry).abs().mean(dim=0)
