"""An embedded, procedurally generated class-conditional data set where positions matter: shapes.

32x32 RGB images of one shape each, 10 classes (circle, ring, square, frame, triangle, plus, star,
hexagon, half disk, L), with random position, size, rotation and colour over varied backgrounds
(flat colour, a linear gradient, stripes or smooth noise). Nothing is downloaded: image ``i`` of a
split is drawn from its own random stream ``(seed, split, i)``, so the data are identical on every
machine, any image can be made alone, and the classes are exactly balanced (label ``i % 10``).

Shapes are rendered at 4x the resolution and box-filtered down (anti-aliased edges). A shape's
class depends on its outline, not on where it is or how it is turned, so a denoiser has to place
it coherently over the 64-256 tokens of a 32x32 image: the relative position bias and the attention
windows of DiffiT have something to do here, unlike on the 16 tokens of the 8x8 digits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffit_toolkit.data.base import DiffusionDataset, label
from diffit_toolkit.data.transforms import match_channels, resize_images

#: Class names, index = label.
SHAPE_CLASSES = ("circle", "ring", "square", "frame", "triangle", "plus", "star", "hexagon", "half_disk", "L")
#: Native side of the shapes.
SHAPES_RESOLUTION = 32
#: Images per split (each a multiple of the 10 classes, so every class has the same count);
#: ``test`` and ``floor`` are the judge's held-out reference and floor sets (disjoint streams).
SHAPES_SPLIT_SIZES = {"train": 10_000, "test": 2_000, "floor": 2_000}
#: Seed of the embedded data set (``split`` and the image index are mixed into it).
SHAPES_SEED = 0
#: Supersampling factor of the renderer (anti-aliasing).
SUPERSAMPLE = 4

_SPLIT_IDS = {"train": 0, "test": 1, "floor": 2}
_MEMO: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _polygon_mask(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Points (u, v) inside a polygon (even-odd rule, vectorised over the points)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (x1, y1), (x2, y2) = vertices[i], vertices[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, radius: float, start: float = math.pi / 2) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of class ``kind`` in the shape's own frame: ``(u, v)`` in units of its radius (|.| <= 1)."""
    r = np.hypot(u, v)
    name = SHAPE_CLASSES[kind]
    if name == "circle":
        return r <= 1.0
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.78
    if name == "frame":
        m = np.maximum(abs(u), abs(v))
        return (m <= 0.85) & (m >= 0.5)
    if name == "triangle":
        return _polygon_mask(u, v, _regular(3, 1.0))
    if name == "plus":
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    if name == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, math.pi / 2 + math.pi / 5)
        return _polygon_mask(u, v, np.stack([outer, inner], axis=1).reshape(10, 2))
    if name == "hexagon":
        return _polygon_mask(u, v, _regular(6, 0.92, 0.0))
    if name == "half_disk":
        return (r <= 1.0) & (v >= -0.1)
    # "L": two bars meeting at a corner
    return ((u >= -0.75) & (u <= -0.25) & (abs(v) <= 0.9)) | ((v >= -0.9) & (v <= -0.4) & (u >= -0.75) & (u <= 0.75))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) background in [0, 1]: flat, gradient, stripes or smooth noise."""
    kind = rng.integers(4)
    c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if kind == 0:
        t = np.zeros((size, size))
    elif kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / (t.max() - t.min() + 1e-9)
    elif kind == 2:
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.15, 0.4)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        c2 = c1 + 0.35 * (c2 - c1)  # low-contrast stripes
    else:
        coarse = rng.uniform(0, 1, (4, 4))
        t = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None, None], size=(size, size),
                                            mode="bicubic", align_corners=True)[0, 0].clamp(0, 1).numpy()
    return c1 + t[..., None] * (c2 - c1)


def render_shape(kind: int, rng: np.random.Generator, size: int = SHAPES_RESOLUTION) -> np.ndarray:
    """One (size, size, 3) float image in [0, 1] of class ``kind`` with random placement and colours."""
    big = size * SUPERSAMPLE
    background = _background(rng, big)
    radius = rng.uniform(0.2, 0.34) * size  # in output pixels
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    # a fill colour that stands out from the background around the shape
    mean_bg = background.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        colour = rng.uniform(0, 1, 3)
        if np.abs(colour - mean_bg).sum() > 0.9:
            break
    else:
        colour = 1.0 - np.round(mean_bg)
    yy, xx = (np.mgrid[0:big, 0:big] + 0.5) / SUPERSAMPLE  # pixel centres in output units
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotate into the shape's frame
    mask = shape_mask(kind, u, -v).astype(np.float64)[..., None]  # -v: y grows downwards in images
    image = background * (1 - mask) + colour * mask
    return image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))


def make_shapes(split: str = "train", seed: int = SHAPES_SEED, num: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 3, 32, 32) in [-1, 1], labels (N,))`` of a split, deterministic from ``seed``.

    Args:
        split: ``"train"``, ``"test"`` or ``"floor"`` (disjoint random streams: the held-out
            reference and floor sets of the judge).
        seed: Data-set seed.
        num: Number of images (default: the split's size); label ``i`` is ``i % 10``.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown shapes split '{split}' (valid: {', '.join(_SPLIT_IDS)})")
    n = SHAPES_SPLIT_SIZES[split] if num is None else int(num)
    key = (split, seed, n)
    larger = [k for k in _MEMO if k[:2] == (split, seed) and k[2] >= n]
    if key not in _MEMO and larger:  # image i does not depend on how many are made
        x, y = _MEMO[larger[0]]
        return x[:n], y[:n]
    if key not in _MEMO:
        images = np.empty((n, SHAPES_RESOLUTION, SHAPES_RESOLUTION, 3), dtype=np.float32)
        labels = np.arange(n) % len(SHAPE_CLASSES)
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
            images[i] = render_shape(int(labels[i]), rng)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1  # (N, 3, 32, 32) in [-1, 1]
        _MEMO[key] = (x, torch.from_numpy(labels).to(torch.int64))
    return _MEMO[key]


class ShapesDataset(DiffusionDataset):
    """The procedurally generated shapes (10 balanced classes, 32x32 RGB, in [-1, 1]).

    Args:
        split: ``"train"`` (10 000 images) or ``"test"`` (2 000 held-out images of another stream).
        resolution: Output side (default 32, the native one).
        channels: 3 (default) or 1 (luminance).
        hflip: Random horizontal flips (mirrors the L shape: leave off to keep the classes apart).
        conditional: Labels 0..9 (``True``) or all 0 (unconditional).
        seed: Data-set seed (``SHAPES_SEED`` is the embedded data set).
    """

    def __init__(self, split: str = "train", resolution: int | None = None, channels: int | None = None,
                 hflip: bool = False, conditional: bool = True, seed: int = SHAPES_SEED) -> None:
        x, y = make_shapes(split, seed)
        self.resolution = resolution or SHAPES_RESOLUTION
        if self.resolution != SHAPES_RESOLUTION:
            x = resize_images(x, self.resolution, "bilinear").clamp(-1, 1)
        if channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        self.images = match_channels(x, channels or 3).contiguous()  # (N, C, R, R)
        self.channels = self.images.shape[1]
        self.labels = y
        self.split = split
        self.hflip = hflip
        self.num_classes = len(SHAPE_CLASSES) if conditional else 0
        self.class_names = list(SHAPE_CLASSES) if conditional else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.labels[index] if self.num_classes else 0
        return self._maybe_flip(self.images[index]), label(y)
