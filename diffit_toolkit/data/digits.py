"""The embedded default data set: scikit-learn's 8x8 handwritten digits (1797 real images, 10 classes)."""

from __future__ import annotations

import numpy as np
import torch

from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.data.transforms import match_channels, resize_images

#: Pixel values of ``sklearn.datasets.load_digits`` run from 0 to this.
DIGITS_MAX_VALUE = 16.0
#: Native side of the digits.
DIGITS_RESOLUTION = 8
#: Held-out share of the fixed, class-stratified split (``split="test"``).
DIGITS_TEST_FRACTION = 0.2
#: Seed of the fixed split: the same images are held out on every machine.
DIGITS_SPLIT_SEED = 0
#: Valid ``split`` values.
DIGITS_SPLITS = ("train", "test", "all")


def digits_split_indices(split: str) -> np.ndarray:
    """Sorted indices into ``load_digits()`` of a split (fixed seed, stratified by class).

    Args:
        split: ``"train"`` (80 %), ``"test"`` (20 %, held out for evaluation) or ``"all"``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in DIGITS_SPLITS:
        raise ValueError(f"unknown digits split '{split}' (valid: {', '.join(DIGITS_SPLITS)})")
    target = load_digits().target
    indices = np.arange(len(target))
    if split == "all":
        return indices
    train, test = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, stratify=target, random_state=DIGITS_SPLIT_SEED
    )
    return np.sort(train if split == "train" else test)


def digits_held_out_halves() -> tuple[np.ndarray, np.ndarray]:
    """The test split cut into two disjoint halves of 180 glyphs: ``(reference, floor)`` indices.

    Every other glyph of each class (in index order) goes to ``floor``; an odd class's extra glyph
    goes to each half in turn, so both halves hold 180 glyphs and every class to within one. The
    offline judges compare samples with ``reference`` and measure their real-vs-real floor with
    ``floor``; neither trains a judge.
    """
    from sklearn.datasets import load_digits

    test = digits_split_indices("test")
    target = load_digits().target[test]
    to_floor = np.zeros(len(test), dtype=bool)
    extra = False
    for c in np.unique(target):
        members = np.flatnonzero(target == c)
        to_floor[members[int(extra)::2]] = True
        extra ^= len(members) % 2 == 1
    return test[~to_floor], test[to_floor]


class DigitsDataset(DiffusionDataset):
    """scikit-learn's handwritten digits, scaled to [-1, 1]; nothing is downloaded.

    Args:
        split: ``"train"``, ``"test"`` (a fixed, class-stratified 20 % held out) or ``"all"``.
        resolution: Output side (default 8, the native one); larger sides are interpolated.
        channels: 1 (default) or 3 (the gray value replicated).
        hflip: Random horizontal flips.
        conditional: Labels 0..9 (``True``) or all 0 (unconditional).
        interpolation: Resampling used when ``resolution`` differs from 8 (``bilinear``, ``nearest``, ``bicubic``).
    """

    def __init__(
        self,
        split: str = "train",
        resolution: int | None = None,
        channels: int | None = None,
        hflip: bool = False,
        conditional: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        index = digits_split_indices(split)
        images = torch.from_numpy(digits.images[index]).to(torch.float32)  # (N, 8, 8) in [0, 16]
        x = images.unsqueeze(1) * (2.0 / DIGITS_MAX_VALUE) - 1.0  # (N, 1, 8, 8) in [-1, 1]
        self.resolution = resolution or DIGITS_RESOLUTION
        x = resize_images(x, self.resolution, interpolation).clamp(-1, 1)  # (N, 1, R, R)
        self.images = match_channels(x, channels or 1).contiguous()  # (N, C, R, R)
        self.channels = self.images.shape[1]
        self.labels = torch.from_numpy(digits.target[index]).to(torch.int64)  # (N,)
        self.split = split
        self.hflip = hflip
        self.num_classes = len(digits.target_names) if conditional else 0
        self.class_names = [str(name) for name in digits.target_names] if conditional else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.labels[index] if self.num_classes else 0
        return self._maybe_flip(self.images[index]), label(y)
