"""The offline judge of the digits canvas: a small CNN that reads which digit is where.

Nothing is downloaded. The judge is trained on the glyphs of the digits' train split (the
generator's own glyphs) pasted at fresh random offsets every epoch, to name the digit *and* to
regress its offset, so its 64-d penultimate features encode both what is drawn and where: a
generator that puts its digits in the wrong places, or only in some, scores a worse Frechet
distance even when the digits themselves are fine.

The judge learns to look past pixel-level nuisance: every training canvas has its glyph turned
and scaled a little, Gaussian pixel noise added and a few pixels set to random values. Without
that, a judge trained on clean canvases rates faint noise or a trace of blur as badly as a wrong
digit (1 % stray pixels cost as much as putting every digit at the centre), so the Frechet
distance measured pixel texture more than digits and places.

Samples are compared with the ``reference`` split (1440 canvases of 180 held-out glyphs); the
real-vs-real floor is the same distance for as many canvases of the ``floor`` split (180 other
held-out glyphs). The judge never trains on a glyph of either (see
[`diffit_toolkit.data.canvas`][diffit_toolkit.data.canvas] and
[`diffit_toolkit.eval.yardsticks`][diffit_toolkit.eval.yardsticks]); at most 1440 samples are scored.
The copy check searches the 11 496 training canvases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffit_toolkit.data.canvas import CANVAS_RESOLUTION, glyphs, make_canvases, paste, random_offsets
from diffit_toolkit.data.digits import DIGITS_RESOLUTION
from diffit_toolkit.eval.digits import batch_as_float, load_judge
from diffit_toolkit.eval.yardsticks import HeldOutJudge, JudgeScore

#: Feature size of the classifier's penultimate layer.
FEATURE_DIM = 64
#: Training epochs of the judge: each train glyph at one fresh offset per epoch (about 22 CPU-seconds on one thread).
JUDGE_EPOCHS = 40
#: Weight of the offset regression beside the class cross-entropy.
POSITION_WEIGHT = 5.0
#: Training augmentations of the judge: Gaussian pixel noise (std), share of pixels set to a
#: random value, largest glyph rotation (degrees) and relative change of scale.
JUDGE_NOISE, JUDGE_STRAY_PIXELS, JUDGE_ROTATION, JUDGE_SCALE = 0.2, 0.02, 30.0, 0.15
#: Name of the judge's cache file; it changes whenever the judge's training changes, so that a
#: cached judge of another design is never reused.
JUDGE_FILE = "canvas_judge_v2.pt"


class CanvasClassifier(nn.Module):
    """Two conv + batch-norm stages on 1x16x16 canvases in [-1, 1]; ``features`` is its 64-d
    penultimate layer, ``forward`` the class logits and ``offset`` its reading of where the
    object is (for the digits: the glyph's top-left corner as a fraction of the free range, 0 at
    the top/left edge and 1 at the bottom/right edge).

    Args:
        num_classes: Class logits (10 digits).
        num_targets: Regressed geometry values (2: the glyph's offset).
    """

    def __init__(self, num_classes: int = 10, num_targets: int = 2) -> None:
        super().__init__()
        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            *stage(1, 32),   # (B, 32, 8, 8)
            *stage(32, 64),  # (B, 64, 4, 4)
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        self.where = nn.Linear(FEATURE_DIM, num_targets)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def offset(self, x: torch.Tensor) -> torch.Tensor:
        return self.where(self.body(x))


def jitter_glyphs(glyph_images: torch.Tensor, gen: torch.Generator, rotation: float = JUDGE_ROTATION,
                  scale: float = JUDGE_SCALE) -> torch.Tensor:
    """Glyphs (B, 8, 8) in [-1, 1], each turned by up to ``rotation`` degrees and scaled by up to
    ``scale`` (relative) about its centre (bilinear; what leaves the 8x8 box is dropped)."""
    n = len(glyph_images)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(rotation)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    ink = glyph_images.unsqueeze(1) + 1  # background 0, so that padding adds none
    grid = nn.functional.affine_grid(theta, list(ink.shape), align_corners=False)
    return nn.functional.grid_sample(ink, grid, align_corners=False, padding_mode="zeros")[:, 0] - 1


def add_nuisance(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Canvases (B, 1, H, W) with the judge's pixel nuisance: Gaussian noise of std
    ``JUDGE_NOISE`` and a share ``JUDGE_STRAY_PIXELS`` of the pixels set to random values."""
    x = x + JUDGE_NOISE * torch.randn(x.shape, generator=gen)
    stray = torch.rand(x.shape, generator=gen) < JUDGE_STRAY_PIXELS
    return torch.where(stray, torch.rand(x.shape, generator=gen) * 2 - 1, x)


def train_canvas_classifier(seed: int = 0, epochs: int = JUDGE_EPOCHS, num: int | None = None,
                            batch: int = 128) -> CanvasClassifier:
    """Train the judge on the train glyphs at fresh random offsets, with the nuisance augmentations
    above (seeded; the first ``num`` glyphs, default all)."""
    images, labels = glyphs("train")
    images, labels = images[:num], labels[:num]
    free = CANVAS_RESOLUTION - DIGITS_RESOLUTION

    def canvases(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        offsets = random_offsets(len(idx), CANVAS_RESOLUTION, gen)  # (B, 2)
        xb = paste(jitter_glyphs(images[idx], gen), offsets, CANVAS_RESOLUTION)  # (B, 1, 16, 16)
        return xb, labels[idx], offsets.float() / free

    return fit_canvas_judge(CanvasClassifier, len(images), canvases, seed, epochs, batch, POSITION_WEIGHT)


def fit_canvas_judge(make: Callable[[], CanvasClassifier], count: int,
                     batches: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     seed: int, epochs: int, batch: int, target_weight: float) -> CanvasClassifier:
    """Train a canvas judge built by ``make()`` (seeded): every epoch visits ``count`` items in a
    random order, ``batches(index, gen)`` returns their ``(canvases, labels, targets)``; the loss is
    the class cross-entropy plus ``target_weight`` times the mean squared error of the geometry
    head on ``targets``, on canvases with the pixel nuisance of ``add_nuisance``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is as fast as two contended ones
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-count // batch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(count, generator=gen)
        for start in range(0, count, batch):
            xb, yb, targets = batches(order[start : start + batch], gen)
            feats = model.features(add_nuisance(xb, gen))
            loss = nn.functional.cross_entropy(model.head(feats), yb)
            loss = loss + target_weight * nn.functional.mse_loss(model.where(feats), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_num_threads(threads)
    return model.eval()


_MEMO: dict[int, CanvasClassifier] = {}


def load_canvas_classifier(seed: int = 0, cache: str | Path | None = None) -> CanvasClassifier:
    """The judge for ``seed``: memoised in the process and, with ``cache``, kept in that file."""
    return load_judge(_MEMO, seed, cache, CanvasClassifier, train_canvas_classifier)


class CanvasScore(JudgeScore):
    """Result of [`CanvasMetric.score`][diffit_toolkit.eval.canvas.CanvasMetric.score] (fields as
    [`JudgeScore`][diffit_toolkit.eval.yardsticks.JudgeScore])."""

    name = "digits_canvas"


def to_canvas_tensor(images: torch.Tensor | np.ndarray, kind: str = "digits_canvas") -> torch.Tensor:
    """Samples as float (B, 1, 16, 16) in [-1, 1]: accepts float [-1, 1] NCHW or uint8 NHWC/NCHW
    (RGB averaged); ``kind`` is the data kind the error message names."""
    x = batch_as_float(images, channels=(1, 3))
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    side = CANVAS_RESOLUTION
    if tuple(x.shape[1:]) != (1, side, side):
        raise ValueError(f"the {kind} metric takes {side}x{side} gray (or gray-as-RGB) canvases, got "
                         f"{tuple(x.shape[1:])}; train with data.kind={kind} at its default resolution")
    return x


class CanvasMetric(HeldOutJudge):
    """Frechet distance (and, with labels, class accuracy) of digits-canvas samples in the feature
    space of [`CanvasClassifier`][diffit_toolkit.eval.canvas.CanvasClassifier], with the fair floor
    and the copy check of [`HeldOutJudge`][diffit_toolkit.eval.yardsticks.HeldOutJudge].

    Args:
        seed: Judge training seed (and seed of the random subsets).
        cache: Optional file where the trained judge is kept.
        classifier: Use this classifier instead of training one (tests).
    """

    what = "digits_canvas"
    score_class = CanvasScore

    def __init__(self, seed: int = 0, cache: str | Path | None = None,
                 classifier: CanvasClassifier | None = None) -> None:
        reference, floor, train = (make_canvases(split) for split in ("reference", "floor", "train"))
        super().__init__(classifier if classifier is not None else load_canvas_classifier(seed, cache),
                         reference=reference[:2], floor=floor[:2], train=train[0], seed=seed)
        self._held_out_offsets = torch.cat([reference[2], floor[2]])

    def to_tensor(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return to_canvas_tensor(images)

    @torch.no_grad()
    def offsets(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The judge's reading of where each glyph sits: (B, 2) top-left (row, column) in pixels."""
        x = self.to_tensor(x)
        free = CANVAS_RESOLUTION - DIGITS_RESOLUTION
        return torch.cat([self.classifier.offset(x[i : i + 500]) for i in range(0, len(x), 500)]) * free

    def offset_error(self) -> float:
        """Mean absolute error (pixels) of the judge's offset reading on the held-out canvases."""
        held_out = torch.cat([self.test_x, self.floor_x])
        return float((self.offsets(held_out) - self._held_out_offsets).abs().mean())
