"""Sampling at scale: images independent of the batch size, the .npz streamed as uint8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffit_toolkit.generate import Generator, save_npz, write_samples
from diffit_toolkit.recipe import SampleSection, parse_recipe
from diffit_toolkit.build import build_process
from diffit_toolkit.registry import backbones


def _generator(sampler: str, classes: int = 3) -> Generator:
    torch.manual_seed(0)
    model = backbones.build("dit", None, input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                            num_heads=2, num_classes=classes, learn_sigma=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    recipe = parse_recipe({"diffusion": {"process": "gaussian", "learn_sigma": True},
                           "sample": {"sampler": sampler, "steps": 5, "guidance_scale": 1.5}})
    facts = {"num_classes": classes, "channels": 1, "resolution": 8, "latent_scale": None, "vae": None}
    return Generator(model.eval(), build_process(recipe), recipe, facts, torch.device("cpu"))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "diffusers:DDPMScheduler"])
def test_images_do_not_depend_on_the_batch_size(sampler):
    gen = _generator(sampler)
    settings = gen.recipe.sample
    a, la = gen.sample(7, settings, batch_size=7, seed=4)
    b, lb = gen.sample(7, settings, batch_size=3, seed=4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # batched matmuls may round differently
    assert torch.equal(la, lb)
    c, _ = gen.sample(7, settings, batch_size=7, seed=5)
    assert (a - c).abs().max() > 0.1  # another seed, other images
    one_class, _ = gen.sample(7, settings, classes=[1], batch_size=7, seed=4)
    first, _ = gen.sample(3, settings, classes=[1], batch_size=2, seed=4)
    torch.testing.assert_close(first, one_class[:3], atol=1e-5, rtol=0)  # image i: its seed, index and label only


def test_write_samples_streams_the_same_images_as_save_npz(tmp_path):
    gen = _generator("ddim")
    images, labels = gen.sample(10, gen.recipe.sample, batch_size=4, seed=1)
    save_npz(images, labels, tmp_path / "whole.npz")
    seen = []
    written = write_samples(gen, 10, gen.recipe.sample, npz=tmp_path / "streamed.npz", grid=tmp_path / "g.png",
                            batch_size=4, seed=1, progress=seen.append)
    assert written == [tmp_path / "streamed.npz", tmp_path / "g.png"] and seen == [4, 8, 10]
    whole, streamed = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "streamed.npz")
    assert streamed["arr_0"].dtype == np.uint8 and streamed["arr_0"].shape == (10, 8, 8, 3)
    assert np.array_equal(whole["arr_0"], streamed["arr_0"]) and np.array_equal(whole["arr_1"], streamed["arr_1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "streamed.npz", "whole.npz"]  # no temporaries left


def test_unconditional_npz_has_no_labels(tmp_path):
    gen = _generator("ddim", classes=0)
    write_samples(gen, 3, SampleSection(sampler="ddim", steps=2), npz=tmp_path / "u.npz", batch_size=2)
    assert list(np.load(tmp_path / "u.npz").keys()) == ["arr_0"]
