"""Fixtures for the data tests: tiny image folders and a tiny random AutoencoderKL saved to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SIDE = 16


def write_png(path: Path, seed: int, side: int = SIDE, mode: str = "RGB") -> np.ndarray:
    """A random image saved as PNG; returns its pixels."""
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return pixels


@pytest.fixture
def png():
    """``png(path, seed, side=16, mode="RGB")`` writes a random PNG and returns its pixels."""
    return write_png


def make_class_folder(root: Path) -> Path:
    """``cats/`` (3 images) and ``dogs/`` (2 images, one in a nested folder) of 16x16 PNGs under ``root``."""
    for i in range(3):
        write_png(root / "cats" / f"c{i}.png", seed=i)
    write_png(root / "dogs" / "d0.png", seed=10)
    write_png(root / "dogs" / "nested" / "d1.png", seed=11)
    return root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """A fresh :func:`make_class_folder` per test."""
    return make_class_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def shared_class_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One :func:`make_class_folder` for tests that only read it."""
    return make_class_folder(tmp_path_factory.mktemp("shared") / "images")


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-level AutoencoderKL (downsampling 2, 4 latent channels) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=SIDE,
    )
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return folder
