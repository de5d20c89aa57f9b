"""Fair yardsticks shared by the offline judges of the embedded data sets (digits, digits canvas, shapes).

A judge is a small classifier trained on real images; samples are scored by the Frechet distance
(FD) of their features (its penultimate layer) to a *reference* set of real held-out images. Three
rules keep the numbers honest:

* **The floor is real-vs-real on held-out images only.** It is the FD of as many real images as
  there are samples, drawn from a *floor* set, to the same reference set. Reference and floor are
  disjoint, and the judge never trained on either: features of a classifier's own training images
  are tighter than those of unseen ones, so a floor built from them sits too high and a good
  generator lands "below the floor".
* **Subsets are class-balanced and random.** When a judge scores fewer images than it was given
  (it scores at most as many as its floor set holds), it takes a seeded random subset with every
  requested class in equal share (a plain random subset without labels).
* **A copy check sits beside the FD.** The median distance (in pixels) from each sample to its
  nearest training image, divided by the same for as many held-out real images: about 1 for a
  model that generalises, well below 1 for one that reproduces its training images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from diffit_toolkit.eval.frechet import fd_from_features

#: Images per forward batch of a judge (features, predictions, nearest neighbours).
JUDGE_BATCH = 500


@dataclass(frozen=True)
class JudgeScore:
    """Result of an offline judge's ``score``.

    Attributes:
        accuracy: share of samples classified as their requested class (``nan`` without labels).
        fd: Frechet distance to the held-out reference images in the classifier's feature space.
        floor: the same distance for as many real held-out images (disjoint from the reference,
            never seen by the judge): the best a generator can expect.
        num_images: number of samples scored (a class-balanced subset when more were given).
        copy_ratio: median nearest-training-image distance of the samples over that of as many
            held-out real images (about 1: no copying; well below 1: training images reproduced).
        num_given: number of samples given.
    """

    accuracy: float
    fd: float
    floor: float
    num_images: int
    copy_ratio: float = float("nan")
    num_given: int = 0
    #: The judge's name at the start of `line`.
    name: ClassVar[str] = "judge"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def line(self) -> str:
        acc = "n/a" if np.isnan(self.accuracy) else f"{100 * self.accuracy:.1f}%"
        subset = f" of {self.num_given}, class-balanced" if self.num_given > self.num_images else ""
        return (f"{self.name}: accuracy {acc}  FD {self.fd:.3f}  (real-vs-real floor {self.floor:.3f}, "
                f"FD/floor {self.fd / self.floor:.2f}, n={self.num_images}{subset})  copy ratio {self.copy_ratio:.2f}")


def balanced_subset(size: int, count: int, labels: torch.Tensor | np.ndarray | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``size`` out of ``count`` items.

    With ``labels`` every class present gets an equal share (when ``size`` does not divide evenly,
    the remainder goes to classes drawn at random; a class with too few items gives its share to
    the others).
    """
    rng = np.random.default_rng(seed)
    if size >= count:
        return np.arange(count)
    if labels is None:
        return np.sort(rng.choice(count, size, replace=False))
    y = np.asarray(labels).reshape(-1)
    members = {c: rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)}
    taken = {c: 0 for c in members}
    chosen: list[int] = []
    while len(chosen) < size:  # one item per class per round, classes in a random order
        for c in rng.permutation(list(members)):
            if len(chosen) < size and taken[c] < len(members[c]):
                chosen.append(int(members[c][taken[c]]))
                taken[c] += 1
    return np.sort(np.asarray(chosen))


@torch.no_grad()
def nearest_distances(x: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """Euclidean pixel distance from every image of ``x`` to its nearest image of ``train``."""
    a, b = x.flatten(1).double(), train.flatten(1).double()  # float64: exact zeros for copies
    return np.concatenate([torch.cdist(a[i : i + JUDGE_BATCH], b).min(dim=1).values.numpy()
                           for i in range(0, len(a), JUDGE_BATCH)])


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


class HeldOutJudge:
    """A classifier's feature space with the fair yardsticks of this module.

    Subclasses set ``what`` and ``score_class`` and implement ``to_tensor`` (samples in any accepted
    layout -> the classifier's float input, with a one-line error for a wrong shape).

    Args:
        classifier: a module with ``features(x)`` (penultimate layer) and ``forward(x)`` (class logits).
        reference: ``(images, labels)``: what samples are compared with.
        floor: ``(images, labels)``: the held-out stand-in for samples; disjoint from ``reference``.
        train: the generator's training images (the copy check's nearest neighbours).
        seed: seed of the random subsets.
    """

    what: ClassVar[str] = "judge"
    score_class: ClassVar[type[JudgeScore]] = JudgeScore

    def __init__(self, classifier: nn.Module, reference: tuple[torch.Tensor, torch.Tensor],
                 floor: tuple[torch.Tensor, torch.Tensor], train: torch.Tensor, seed: int = 0) -> None:
        self.classifier = classifier.eval()
        self.seed = seed
        self.test_x, self.test_y = reference
        self.floor_x, self.floor_y = floor
        self.train_x = self.to_tensor(train)
        self.test_features = self.features(self.test_x)
        self.floor_features = self.features(self.floor_x)
        self._floor_nn = nearest_distances(self.to_tensor(self.floor_x), self.train_x)
        self._floors: dict[int, float] = {}

    @property
    def max_images(self) -> int:
        """The most samples scored at once (the size of the floor set)."""
        return len(self.floor_x)

    def to_tensor(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def features(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        x = self.to_tensor(x)
        return np.concatenate([self.classifier.features(x[i : i + JUDGE_BATCH]).double().numpy()
                               for i in range(0, len(x), JUDGE_BATCH)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = self.to_tensor(x)
        return torch.cat([self.classifier(x[i : i + JUDGE_BATCH]).argmax(dim=1) for i in range(0, len(x), JUDGE_BATCH)])

    def test_accuracy(self) -> float:
        """Accuracy of the classifier on the held-out real images (reference and floor sets)."""
        x, y = torch.cat([self.test_x, self.floor_x]), torch.cat([self.test_y, self.floor_y])
        return float((self.predict(x) == y).float().mean())

    def _floor_subset(self, n: int) -> np.ndarray:
        if n > self.max_images:
            raise ValueError(f"the {self.what} floor set holds {self.max_images} images; score at most that many samples")
        return balanced_subset(n, self.max_images, self.floor_y, self.seed)

    def floor(self, n: int) -> float:
        """FD of ``n`` real floor-set images (a fixed class-balanced draw) to the reference set."""
        if n not in self._floors:
            self._floors[n] = fd_from_features(self.floor_features[self._floor_subset(n)], self.test_features)
        return self._floors[n]

    def copy_ratio(self, x: torch.Tensor | np.ndarray) -> float:
        """Median nearest-training-image distance of samples ``x`` over that of as many floor-set images."""
        x = self.to_tensor(x)
        held_out = float(np.median(self._floor_nn[self._floor_subset(len(x))]))
        return float(np.median(nearest_distances(x, self.train_x))) / held_out

    def score(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> JudgeScore:
        """Score samples (float [-1, 1] NCHW or uint8 NHWC as in an ADM ``.npz``) with their requested
        labels (``None``: unconditional; accuracy is ``nan``). More samples than ``max_images``: a
        seeded class-balanced random subset of ``max_images`` is scored."""
        x = self.to_tensor(images)
        given = len(x)
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
            if len(labels) != given:
                raise ValueError(f"{given} images but {len(labels)} labels")
        if given > self.max_images:
            keep = torch.from_numpy(balanced_subset(self.max_images, given, labels, self.seed))
            x = x[keep]
            labels = labels[keep] if labels is not None else None
        accuracy, fd = accuracy_and_fd(x, labels, self.predict, self.features, self.test_features, self.what)
        return self.score_class(accuracy, fd, self.floor(len(x)), len(x), self.copy_ratio(x), given)
