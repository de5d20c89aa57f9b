"""Samples ask for their classes in turn: every block of consecutive images holds every class in equal
share (the .npz, its shards under several processes, a metric's first n), and the grid still shows
one class per row."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffit_toolkit.build import build_process
from diffit_toolkit.inference.pipeline import Pipeline
from diffit_toolkit.inference.writers import save_sample_grid, write_samples
from diffit_toolkit.recipe import parse_recipe
from diffit_toolkit.registry import backbones


def _pipeline(classes: int) -> Pipeline:
    torch.manual_seed(0)
    model = backbones.build("dit", None, input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                            num_heads=2, num_classes=classes, learn_sigma=True)
    recipe = parse_recipe({"diffusion": {"process": "gaussian", "learn_sigma": True},
                           "sample": {"sampler": "ddim", "steps": 2, "guidance_scale": 1.0}})
    facts = {"num_classes": classes, "channels": 1, "resolution": 8, "latent_scale": None, "vae": None}
    return Pipeline(model.eval(), build_process(recipe), recipe, facts, torch.device("cpu"))


def test_labels_take_turns():
    gen = _pipeline(4)
    labels = gen.labels(None, 11).tolist()
    assert labels == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    for start in range(0, 8):  # any 4 consecutive images: every class once
        assert sorted(labels[start : start + 4]) == [0, 1, 2, 3]
    assert gen.labels([3, 1], 5).tolist() == [3, 1, 3, 1, 3]
    assert _pipeline(0).labels(None, 5) is None


def test_npz_is_class_interleaved_and_the_grid_one_class_per_row(tmp_path):
    gen = _pipeline(3)
    npz, grid = tmp_path / "s.npz", tmp_path / "grid.png"
    write_samples(gen, 12, gen.recipe.sample, npz=npz, grid=grid, batch_size=5, seed=0)
    assert np.load(npz)["arr_1"].tolist() == [0, 1, 2] * 4
    # the grid groups the turns by class: 3 rows of 4 images (cells upscaled to at least 32 px, 2 px padding)
    width, height = Image.open(grid).size
    assert (width - 2) // (height // 3) == 4


def test_grid_keeps_whole_turns_and_groups_them_by_label(tmp_path, monkeypatch):
    import diffit_toolkit.inference.writers as writers

    seen = {}
    monkeypatch.setattr(writers, "save_grid", lambda images, path, rows: seen.update(images=images, rows=rows) or path)
    images = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1)
    save_sample_grid(images, torch.tensor([0, 1, 2, 0, 1, 2, 0]), tmp_path / "g.png")
    assert seen["rows"] == 3 and seen["images"].flatten().tolist() == [0, 3, 1, 4, 2, 5]
