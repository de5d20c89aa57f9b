"""What every dataset of the toolkit provides: ``(x, y)`` items and the facts a trainer needs."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class DiffusionDataset(Dataset):
    """Base class: items are ``(x, y)``.

    ``x`` is a float32 tensor (C, H, W): images in [-1, 1], or scaled latents for latent datasets;
    ``y`` is an int64 scalar class label (0 for unconditional datasets).

    Attributes:
        num_classes: Number of class labels (0 = unconditional).
        channels: C of every ``x``.
        resolution: H = W of every ``x``.
        class_names: Name per label (index = label), or ``None``.
        hflip: Whether items are flipped horizontally at random (half of the time).
    """

    num_classes: int = 0
    channels: int
    resolution: int
    class_names: list[str] | None = None
    hflip: bool = False

    def _maybe_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Flip (C, H, W) along W with probability 1/2 when ``hflip`` is on."""
        if self.hflip and torch.rand(()) < 0.5:
            return x.flip(-1)
        return x

    def __repr__(self) -> str:
        conditioning = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        return f"{type(self).__name__}({len(self)} items, {self.channels}x{self.resolution}x{self.resolution}, {conditioning})"


def label(value: int) -> torch.Tensor:
    """An int64 scalar label tensor."""
    return torch.tensor(int(value), dtype=torch.int64)
