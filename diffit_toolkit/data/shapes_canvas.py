"""An embedded testbed where positions and sizes matter and a CPU learns to the floor: white shapes
on a black 16x16 canvas.

Each image is one white shape (circle, square, triangle or plus) of random size, position and
rotation on a black 16x16 canvas: 64 tokens at patch 2, shapes from 5 to 12 pixels across, so a
denoiser has to draw one coherent outline at any place and scale of the grid (the relative position
bias and the attention windows of DiffiT have work to do). The content is simple on purpose: the
digits canvas asks a small model to learn 1437 handwritten glyphs as well, which takes it far longer
than placing them; here what is left to learn is the outline, its place and its size.

Nothing is downloaded. Image ``i`` of a split is drawn from its own random stream
``(seed, split, i)``, so the data are identical on every machine, and label ``i % 4`` keeps the
classes exactly balanced. Shapes are rendered at 4x the resolution and box-filtered down
(anti-aliased edges, sub-pixel positions).

The three splits keep the judge honest (see ``docs/evaluation.md``): ``train`` is what the
diffusion model and the judge train on; ``reference`` (what samples are compared with) and
``floor`` (the real stand-in for samples: the real-vs-real floor) are disjoint random streams that
neither ever sees.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.data.shapes import SHAPE_CLASSES, SUPERSAMPLE, shape_mask
from diffit_toolkit.data.transforms import match_channels

#: Class names, index = label (the outlines of the embedded shapes that stay apart at this size).
SHAPES_CANVAS_CLASSES = ("circle", "square", "triangle", "plus")
#: Canvas side: 16 (an 8x8 token grid at patch 2).
SHAPES_CANVAS_RESOLUTION = 16
#: Smallest and largest shape radius, in pixels (shapes 5 to 12 pixels across).
RADIUS_RANGE = (2.5, 6.0)
#: Images per split (multiples of the 4 classes); ``reference`` and ``floor`` hold as many images
#: as the judge scores at most.
SHAPES_CANVAS_SPLIT_SIZES = {"train": 20_000, "reference": 1440, "floor": 1440}
#: The named splits.
SHAPES_CANVAS_SPLITS = tuple(SHAPES_CANVAS_SPLIT_SIZES)
#: Seed of the embedded data set (the split and the image index are mixed into it).
SHAPES_CANVAS_SEED = 0

_SPLIT_IDS = {"train": 0, "reference": 1, "floor": 2}
_KINDS = [SHAPE_CLASSES.index(name) for name in SHAPES_CANVAS_CLASSES]
_MEMO: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def render(kind: int, rng: np.random.Generator, side: int = SHAPES_CANVAS_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """One white shape of class ``kind`` (an index into ``SHAPES_CANVAS_CLASSES``) on black.

    Returns ``(image (side, side) in [0, 1], geometry (3,))`` where geometry is the shape's centre
    (row, column) and radius in pixels.
    """
    radius = rng.uniform(*RADIUS_RANGE)
    cx, cy = rng.uniform(radius, side - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    big = side * SUPERSAMPLE
    yy, xx = (np.mgrid[0:big, 0:big] + 0.5) / SUPERSAMPLE  # pixel centres in output units
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotate into the shape's frame
    mask = shape_mask(_KINDS[kind], u, -v).astype(np.float32)  # -v: y grows downwards in images
    image = mask.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))
    return image, np.array([cy, cx, radius], dtype=np.float32)


def make_shapes_canvas(split: str = "train", seed: int = SHAPES_CANVAS_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 16, 16) in [-1, 1], labels (N,), geometry (N, 3))`` of a split.

    Geometry is each shape's centre (row, column) and radius in pixels. Image ``i`` comes from the
    random stream ``(seed, split, i)`` and has label ``i % 4``.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown shapes_canvas split '{split}' (valid: {', '.join(SHAPES_CANVAS_SPLITS)})")
    key = (split, seed)
    if key not in _MEMO:
        n, side = SHAPES_CANVAS_SPLIT_SIZES[split], SHAPES_CANVAS_RESOLUTION
        images = np.empty((n, side, side), dtype=np.float32)
        geometry = np.empty((n, 3), dtype=np.float32)
        labels = np.arange(n) % len(SHAPES_CANVAS_CLASSES)
        for i in range(n):
            images[i], geometry[i] = render(int(labels[i]), np.random.default_rng([seed, _SPLIT_IDS[split], i]))
        x = torch.from_numpy(images).unsqueeze(1) * 2 - 1  # (N, 1, 16, 16) in [-1, 1]
        _MEMO[key] = (x.contiguous(), torch.from_numpy(labels).to(torch.int64), torch.from_numpy(geometry))
    return _MEMO[key]


class ShapesCanvasDataset(DiffusionDataset):
    """White shapes of random size, place and rotation on a black 16x16 canvas (in [-1, 1]).

    Args:
        split: ``"train"`` (20 000 images), ``"reference"`` or ``"floor"`` (1440 images each of
            two other random streams: the judge's held-out sets).
        resolution: 16 or ``None`` (the canvas is drawn at 16x16 only).
        channels: 1 (default) or 3 (the gray value replicated).
        hflip: Random horizontal flips (the classes are mirror-symmetric up to rotation).
        conditional: Labels 0..3 (``True``) or all 0 (unconditional, the benchmark's setting).
        seed: Data-set seed (``SHAPES_CANVAS_SEED`` is the embedded data set).
    """

    def __init__(self, split: str = "train", resolution: int | None = None, channels: int | None = None,
                 hflip: bool = False, conditional: bool = True, seed: int = SHAPES_CANVAS_SEED) -> None:
        if resolution not in (None, SHAPES_CANVAS_RESOLUTION):
            raise ValueError(f"the shapes canvas is drawn at {SHAPES_CANVAS_RESOLUTION}x{SHAPES_CANVAS_RESOLUTION} "
                             f"only, got resolution={resolution}; leave resolution out")
        x, y, geometry = make_shapes_canvas(split, seed)
        self.resolution = SHAPES_CANVAS_RESOLUTION
        self.images = match_channels(x, channels or 1).contiguous()  # (N, C, 16, 16)
        self.channels = self.images.shape[1]
        self.labels = y
        self.geometry = geometry
        self.split = split
        self.hflip = hflip
        self.num_classes = len(SHAPES_CANVAS_CLASSES) if conditional else 0
        self.class_names = list(SHAPES_CANVAS_CLASSES) if conditional else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.labels[index] if self.num_classes else 0
        return self._maybe_flip(self.images[index]), label(y)
