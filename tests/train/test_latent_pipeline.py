"""Latent models end to end: cache with a (tiny, random, offline) VAE, train, sample, decode with
the recorded VAE and scale."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffit_toolkit.data import cache_latents, decode_latents, load_vae
from diffit_toolkit.inference.pipeline import load_pipeline
from diffit_toolkit.build import validate_recipe
from diffit_toolkit.train import train


def test_train_and_sample_on_cached_latents(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(8):
            (tmp_path / "images" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    meta = cache_latents(tmp_path / "images", tmp_path / "latents", vae=str(tmp_path / "vae"), resolution=16, batch_size=8)
    assert meta.num_classes == 2

    recipe = validate_recipe({
        "name": "latent", "output_dir": str(tmp_path / "run"),
        "model": {"backbone": "latent_diffit", "preset": None, "patch_size": 2, "hidden_size": 32, "depth": 1, "num_heads": 2},
        "diffusion": {"process": "gaussian", "learn_sigma": True},
        "data": {"kind": "latents", "path": str(tmp_path / "latents"), "hflip": True},
        "train": {"batch_size": 8, "max_steps": 2, "log_every": 1},
        "sample": {"sampler": "ddpm", "steps": 3, "num_images": 4, "guidance_scale": 1.5, "guided_channels": 3},
    })
    result = train(recipe, device="cpu", progress=False)
    assert result.model.config["in_channels"] == 4 and result.model.config["input_size"] == 8  # from the data
    assert result.model.config["num_classes"] == 2 and result.model.out_channels == 8  # learned sigma: 2C

    gen = load_pipeline(tmp_path / "run", device="cpu")
    assert gen.facts["latent_scale"] == meta.latent_scale and gen.facts["vae"] == meta.vae
    images, labels = gen.sample(4, gen.recipe.sample, batch_size=4, seed=0)
    assert images.shape == (4, 3, 16, 16) and images.min() >= -1 and images.max() <= 1  # decoded pixels

    # the decode used the recorded scale: the same latents decoded by hand give the same images
    latents = []
    original = decode_latents

    def spy(vae, z, scale):
        latents.append((z.clone(), scale))
        return original(vae, z, scale)

    monkeypatch.setattr("diffit_toolkit.data.decode_latents", spy)
    again, _ = gen.sample(4, gen.recipe.sample, batch_size=4, seed=0)
    (z, scale), = latents
    assert scale == meta.latent_scale
    torch.testing.assert_close(again, original(load_vae(meta.vae), z, meta.latent_scale).clamp(-1, 1))
    torch.testing.assert_close(again, images)

    # the .npz of decoded samples declares the decoded side (the VAE upsamples 8 -> 16), which
    # np.load and the ADM evaluator's reader take from the header
    from diffit_toolkit.inference.writers import write_samples

    assert gen.image_shape() == (16, 16, 3)
    write_samples(gen, 5, gen.recipe.sample, npz=tmp_path / "s.npz", batch_size=2, seed=0)
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["arr_0"].shape == (5, 16, 16, 3) and arrays["arr_1"].shape == (5,)
    decoded, _ = gen.sample(5, gen.recipe.sample, batch_size=2, seed=0)
    from diffit_toolkit.inference.writers import to_uint8_nhwc

    assert np.array_equal(arrays["arr_0"], to_uint8_nhwc(decoded))
