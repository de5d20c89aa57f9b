"""Encode an image folder once into a latent cache (plain + flipped latents per image), resumably."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from diffit_toolkit.data.image_folder import ImageFolderDataset, check_resolution
from diffit_toolkit.data.latents import LatentMeta, read_shard_digest, shard_digest, shard_name
from diffit_toolkit.data.vae import encode_raw, load_vae, vae_latent_scale

#: Storage dtypes accepted for the cached latents.
LATENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _fingerprint(dataset: ImageFolderDataset, start: int, stop: int, settings: dict[str, str]) -> dict[str, str]:
    """What identifies a shard's content; a shard on disk with the same one is reused when resuming."""
    first, last = (str(dataset.samples[i][0].relative_to(dataset.root)) for i in (start, stop - 1))
    return {**settings, "count": str(stop - start), "first": first, "last": last}


def _complete(file: Path, fingerprint: dict[str, str]) -> str | None:
    """The checksum of a finished shard with this fingerprint whose bytes are intact, else ``None``
    (missing, foreign, interrupted or damaged: encode it again)."""
    if not file.is_file():
        return None
    try:
        metadata, digest = read_shard_digest(file)
    except ValueError:
        return None
    recorded = metadata.pop("sha256", None)
    return digest if metadata == fingerprint and recorded == digest else None


def cache_latents(
    data_path: str | Path,
    out_dir: str | Path,
    vae: str,
    resolution: int = 256,
    batch_size: int = 32,
    shard_size: int = 4096,
    device: str | torch.device = "cpu",
    conditional: bool = True,
    dtype: str = "float16",
    sample: bool = False,
    seed: int = 0,
    latent_scale: float | None = None,
    on_bad_file: str = "skip",
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> LatentMeta:
    """Encode an image folder with a VAE into ``out_dir`` (safetensors shards + ``meta.json``).

    Every image is ADM-center-cropped to ``resolution`` and encoded twice, plain and mirrored.
    Shards are written atomically (temporary file, then rename) and carry a fingerprint of their
    inputs and a checksum of their bytes, so re-running the same command after an interruption
    skips the finished shards and encodes a damaged one again.

    Args:
        data_path: Image folder (class subfolders, or flat with ``conditional=False``).
        out_dir: Cache folder (created).
        vae: VAE folder or cached hub id (see [`load_vae`][diffit_toolkit.data.vae.load_vae]);
            recorded in ``meta.json``.
        resolution: Image side to encode at (a multiple of the VAE's downsampling factor, e.g. 256).
        batch_size: Images per VAE call (each is encoded plain and flipped).
        shard_size: Images per shard file.
        device: Device for the VAE.
        conditional: Class subfolders as labels, or a flat folder with label 0.
        dtype: ``float16`` (half the disk) or ``float32``.
        sample: Store one posterior sample (DiT's ``extract_features``) instead of the posterior mean.
        seed: Seed of the posterior samples (per shard: ``seed + shard index``).
        latent_scale: Scale to record; default: the VAE's ``scaling_factor`` (0.18215 for SD's VAE).
        on_bad_file: ``skip`` unreadable images (listed in ``meta.json``) or ``stop``.
        num_workers: ``DataLoader`` workers reading images.
        progress: Called as ``progress(done, total)`` images after each batch.

    Returns:
        The [`LatentMeta`][diffit_toolkit.data.latents.LatentMeta] written.
    """
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LATENT_DTYPES)}, got '{dtype}'")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    check_resolution(resolution)  # before the VAE is loaded: --resolution 100000 would fill the memory
    model = load_vae(vae, device=device)  # a wrong VAE fails at once, before the image folder is scanned
    dataset = ImageFolderDataset(data_path, resolution, channels=3, conditional=conditional, on_bad_file=on_bad_file)
    scale = vae_latent_scale(model) if latent_scale is None else float(latent_scale)
    recorded_vae = str(Path(vae).expanduser().resolve()) if Path(vae).expanduser().is_dir() else vae  # usable from any folder
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"vae": recorded_vae, "image_resolution": str(resolution), "dtype": dtype, "stored": "sample" if sample else "mean", "seed": str(seed)}
    total, shards, done = len(dataset), [], 0
    latent_shape: tuple[int, ...] = ()
    for index in range(math.ceil(total / shard_size)):
        start, stop = index * shard_size, min(total, (index + 1) * shard_size)
        file, fingerprint = out / shard_name(index), _fingerprint(dataset, start, stop, settings)
        digest = _complete(file, fingerprint)
        if digest is None:
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + index)
            loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=num_workers)
            latents, labels = [], []
            for x, y in loader:  # x: (B, 3, H, W)
                pair = [encode_raw(model, v, sample=sample, generator=generator) for v in (x, x.flip(-1))]
                latents.append(torch.stack(pair, dim=1).to(LATENT_DTYPES[dtype]).cpu())  # (B, 2, C, h, w)
                labels.append(y)
                done += len(y)
                if progress:
                    progress(done, total)
            tensors = {"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels).to(torch.int64)}
            digest = shard_digest(tensors)
            tmp = file.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={**fingerprint, "sha256": digest})
            os.replace(tmp, file)
        else:
            done += stop - start
            if progress:
                progress(done, total)
        shards.append({"file": file.name, "count": stop - start, "sha256": digest})
        with safe_open(str(file), framework="pt") as handle:
            latent_shape = tuple(handle.get_slice("latents").get_shape()[2:])  # (C, h, w)
    meta = LatentMeta(
        latent_scale=scale,
        vae=recorded_vae,
        channels=latent_shape[0],
        resolution=latent_shape[1],
        image_resolution=resolution,
        num_classes=dataset.num_classes,
        class_names=dataset.class_names,
        num_items=total,
        shards=shards,
        stored=settings["stored"],
        dtype=dtype,
        source=str(Path(data_path).resolve()),
        skipped=list(dataset.skipped),
    )
    meta.save(out)
    return meta

