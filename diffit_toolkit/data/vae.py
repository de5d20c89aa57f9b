"""The diffusers ``AutoencoderKL``: offline-safe loading, encoding to scaled latents, decoding with the recorded scale."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from diffit_toolkit.data.latents import SD_VAE_LATENT_SCALE

if TYPE_CHECKING:  # diffusers takes seconds to import: only when a VAE is used
    from diffusers import AutoencoderKL

#: The usual VAE of DiT / DiffiT latent models (``huggingface-cli download`` it where there is internet).
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1 or Path(name).exists()


def load_vae(
    name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` without touching the network.

    A local folder is loaded directly (a pipeline folder with a ``vae/`` subfolder works too); a hub id
    (``owner/name``) is only looked up in the local Hugging Face cache (``local_files_only=True``).

    Args:
        name_or_path: A folder saved with ``save_pretrained`` or a hub id such as ``stabilityai/sd-vae-ft-ema``.
        device: Where to put the model.
        dtype: Parameter dtype.

    Returns:
        The VAE in eval mode with gradients off.

    Raises:
        ValueError: One line naming the folder or id that could not be loaded and how to get it.
    """
    from diffusers import AutoencoderKL

    name = str(name_or_path)
    options = {"local_files_only": True, "low_cpu_mem_usage": False, "torch_dtype": dtype}
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ValueError(f"VAE folder '{name}' does not exist (pass a folder saved with save_pretrained, or a hub id)")
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            options["subfolder"] = "vae"
        source = str(folder)
    else:
        source = name
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # huggingface_hub noise from diffusers
            vae = AutoencoderKL.from_pretrained(source, **options)
    except (OSError, ValueError) as exc:
        if source is name:
            raise ValueError(
                f"VAE '{name}' is not in the local Hugging Face cache and nothing is downloaded here: on a machine with "
                f"internet run `huggingface-cli download {name} --local-dir VAE_DIR`, copy VAE_DIR here and pass --vae VAE_DIR"
            ) from exc
        raise ValueError(f"cannot load a diffusers AutoencoderKL from '{name}': {' '.join(str(exc).split())}") from exc
    return vae.to(device).eval().requires_grad_(False)


def vae_latent_scale(vae: AutoencoderKL) -> float:
    """The VAE's own ``scaling_factor`` (0.18215 for SD's VAE), or `SD_VAE_LATENT_SCALE` when it has none."""
    return float(getattr(vae.config, "scaling_factor", None) or SD_VAE_LATENT_SCALE)


@torch.no_grad()
def encode_raw(
    vae: AutoencoderKL, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Unscaled latents of images.

    Args:
        vae: The autoencoder.
        x: Images (B, 3, H, W) in [-1, 1].
        sample: Draw from the posterior (as DiT's ``extract_features``) instead of taking its mean.
        generator: Random generator for ``sample=True``.

    Returns:
        float32 latents (B, C, H / f, W / f), f the VAE's downsampling factor.
    """
    parameter = next(vae.parameters())
    posterior = vae.encode(x.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mean
    return z.to(torch.float32)


def encode_images(
    vae: AutoencoderKL,
    x: torch.Tensor,
    latent_scale: float | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scaled latents (what a latent diffusion model trains on): ``encode_raw(...) * latent_scale``.

    Args:
        vae: The autoencoder.
        x: Images (B, 3, H, W) in [-1, 1].
        latent_scale: Default: the VAE's ``scaling_factor`` (see
            [`vae_latent_scale`][diffit_toolkit.data.vae.vae_latent_scale]).
        sample: Posterior sample instead of mean.
        generator: Random generator for ``sample=True``.

    Returns:
        float32 latents (B, C, h, w).
    """
    scale = vae_latent_scale(vae) if latent_scale is None else latent_scale
    return encode_raw(vae, x, sample=sample, generator=generator) * scale


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor, latent_scale: float) -> torch.Tensor:
    """Images from scaled latents: ``vae.decode(z / latent_scale)``, clamped to [-1, 1].

    Args:
        vae: The autoencoder.
        z: Scaled latents (B, C, h, w), e.g. model samples or items of a `LatentDataset`.
        latent_scale: The scale recorded with the latents (``LatentDataset.latent_scale`` / ``meta.json``).

    Returns:
        float32 images (B, 3, H, W) in [-1, 1], on ``z``'s device.
    """
    parameter = next(vae.parameters())
    images = vae.decode(z.to(device=parameter.device, dtype=parameter.dtype) / latent_scale).sample
    return images.to(device=z.device, dtype=torch.float32).clamp(-1, 1)
