"""Data: the embedded digits, image folders, ``.npz`` arrays, cached VAE latents and the VAE helpers.

Every dataset returns ``(x, y)``: ``x`` float32 (C, H, W) in [-1, 1] (latents: already scaled),
``y`` an int64 scalar label; see [`DiffusionDataset`][diffit_toolkit.data.base.DiffusionDataset].
"""

from diffit_toolkit.data.base import DiffusionDataset
from diffit_toolkit.data.cache import cache_latents
from diffit_toolkit.data.config import DataConfig, DatasetKind, build_dataset, dataset_kind
from diffit_toolkit.data.digits import DigitsDataset, digits_split_indices
from diffit_toolkit.data.image_folder import IMAGE_EXTENSIONS, BadImageError, ImageFolderDataset
from diffit_toolkit.data.latents import SD_VAE_LATENT_SCALE, LatentDataset, LatentMeta
from diffit_toolkit.data.npz import NpzDataset
from diffit_toolkit.data.vae import decode_latents, encode_images, encode_raw, load_vae, vae_latent_scale

__all__ = [
    "IMAGE_EXTENSIONS",
    "SD_VAE_LATENT_SCALE",
    "BadImageError",
    "DataConfig",
    "DatasetKind",
    "DiffusionDataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "LatentMeta",
    "NpzDataset",
    "build_dataset",
    "dataset_kind",
    "cache_latents",
    "decode_latents",
    "digits_split_indices",
    "encode_images",
    "encode_raw",
    "load_vae",
    "vae_latent_scale",
]
