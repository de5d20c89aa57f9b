"""Cached VAE latents: the on-disk format (safetensors shards + ``meta.json``) and the dataset reading it.

A cache folder holds ``shard-00000.safetensors``, ... each with

* ``latents``: (n, 2, C, h, w) float16 or float32, the *unscaled* VAE latents of every image and
  of its horizontal mirror (``[:, 0]`` plain, ``[:, 1]`` flipped);
* ``labels``: (n,) int64;

and ``meta.json`` recording the latent scale, the VAE, the shapes, the classes and the format version,
so decoding always divides by the scale the latents were made with.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from diffit_toolkit.errors import first_line, read_json_object
from diffit_toolkit.data.base import DiffusionDataset, label

#: Stable Diffusion's VAE latent scale (``latents * scale`` has roughly unit variance); DiT, LDM and DiffiT use it.
SD_VAE_LATENT_SCALE = 0.18215
#: Name of the cache's description file.
META_FILE = "meta.json"
#: ``format`` field of ``meta.json``.
LATENT_FORMAT = "diffit-toolkit-latents"
#: Current format version (readers refuse newer ones).
LATENT_FORMAT_VERSION = 1
#: Number of stored variants per image: plain and horizontally flipped.
FLIP_VARIANTS = 2


#: The tensors of a shard, in the order their bytes enter its checksum.
SHARD_TENSORS = ("latents", "labels")


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.safetensors"


def shard_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a shard's tensor bytes (``latents``, then ``labels``): its checksum, stored in the
    shard's own metadata and in ``meta.json``."""
    digest = hashlib.sha256()
    for name in SHARD_TENSORS:
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def read_shard_digest(file: Path) -> tuple[dict[str, str], str]:
    """A shard's metadata and the checksum of the bytes it holds now; ``ValueError`` when the file
    cannot be read as a shard (truncated, foreign, a damaged header)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return metadata, shard_digest({name: handle.get_tensor(name) for name in SHARD_TENSORS})
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise ValueError(f"'{file}' is not a readable latent shard ({first_line(exc)})") from None


def verify_shard(file: Path, expected: str) -> None:
    """One-line ``ValueError`` unless ``file`` holds the bytes whose checksum ``meta.json`` records."""
    _, actual = read_shard_digest(file)
    if actual != expected:
        raise ValueError(f"latent shard '{file}' is damaged: its content does not match the checksum in {META_FILE} "
                         f"(delete the shard and re-run cache-latents with the same arguments to encode it again)")


@dataclass
class LatentMeta:
    """The contents of ``meta.json``.

    Attributes:
        latent_scale: Multiply stored latents by this for training; divide model outputs by it before decoding.
        vae: The VAE folder or hub id the latents were encoded with.
        channels: Latent channels C.
        resolution: Latent side h = w.
        image_resolution: Side of the images that were encoded.
        num_classes: Number of class labels (0 = unconditional).
        class_names: Name per label, or ``None``.
        num_items: Number of images (each stored plain and flipped).
        shards: ``{"file": name, "count": n, "sha256": checksum}`` per shard, in order (caches
            written before checksums existed have none, and are read unchecked).
        stored: ``"mean"`` (the posterior mean, deterministic) or ``"sample"`` (one posterior sample).
        dtype: Storage dtype of the latents (``float16`` or ``float32``).
        source: The image folder that was encoded.
        skipped: Unreadable image files left out.
        format: Always `LATENT_FORMAT`.
        version: Format version.
    """

    latent_scale: float
    vae: str
    channels: int
    resolution: int
    image_resolution: int
    num_classes: int
    class_names: list[str] | None
    num_items: int
    shards: list[dict[str, Any]]
    stored: str = "mean"
    dtype: str = "float16"
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    format: str = LATENT_FORMAT
    version: int = LATENT_FORMAT_VERSION

    def save(self, folder: str | Path) -> Path:
        """Write ``meta.json`` into ``folder`` atomically (temporary file, then rename)."""
        path = Path(folder) / META_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> LatentMeta:
        """Read ``folder/meta.json``; one-line ``ValueError`` when missing, foreign or too new."""
        path = Path(folder) / META_FILE
        if not path.is_file():
            raise ValueError(f"no {META_FILE} in '{folder}' (create the cache with: diffit-toolkit cache-latents IMAGES '{folder}' --vae ...)")
        data = read_json_object(path, "a latent cache description", "; the cache is damaged: create it again")
        if data.get("format") != LATENT_FORMAT:
            raise ValueError(f"'{path}' is not a {LATENT_FORMAT} cache (format: {data.get('format')})")
        if data.get("version", 0) > LATENT_FORMAT_VERSION:
            raise ValueError(f"'{path}' has format version {data['version']}, newer than {LATENT_FORMAT_VERSION} (update diffit-toolkit)")
        shards = data.get("shards")
        if not isinstance(shards, list) or not all(isinstance(x, dict) and isinstance(x.get("file"), str) for x in shards):
            raise ValueError(f"'{path}': 'shards' must list {{\"file\": name, \"count\": n}} entries; the cache is damaged")
        for shard in shards:  # a shard is a file of the cache folder, never a path out of it
            name = shard["file"]
            if Path(name).name != name or name in ("", ".", "..") or (Path(folder) / name).is_symlink():
                raise ValueError(f"'{path}' names the shard '{name}', which is not a file of the cache folder; "
                                 f"the cache is damaged or was edited: create it again")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class LatentDataset(DiffusionDataset):
    """Cached latents, returned already multiplied by the recorded ``latent_scale``.

    Shards are memory-mapped (``safetensors.safe_open``) and opened lazily in each process, so the
    dataset works with ``DataLoader`` workers and caches larger than memory.

    Args:
        path: The cache folder (with ``meta.json``).
        resolution: Optional check: the latent side, or the encoded image side; must match the cache.
        channels: Optional check: latent channels; must match the cache.
        hflip: Pick the stored flipped variant half of the time.
        conditional: Use the stored labels; otherwise every label is 0.

    Attributes:
        latent_scale: The scale the latents were cached with (pass it to ``decode_latents``).
        vae: The VAE folder or hub id recorded at caching time.
        meta: The whole [`LatentMeta`][diffit_toolkit.data.latents.LatentMeta].
    """

    def __init__(
        self,
        path: str | Path,
        resolution: int | None = None,
        channels: int | None = None,
        hflip: bool = False,
        conditional: bool = True,
    ) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"latent cache folder '{self.root}' does not exist")
        meta = self.meta = LatentMeta.load(self.root)
        if resolution is not None and resolution not in (meta.resolution, meta.image_resolution):
            raise ValueError(
                f"latent cache '{self.root}' holds {meta.resolution}x{meta.resolution} latents of {meta.image_resolution}px images, "
                f"not resolution={resolution} (set resolution={meta.resolution} or leave it unset)"
            )
        if channels is not None and channels != meta.channels:
            raise ValueError(f"latent cache '{self.root}' has {meta.channels} latent channels, not channels={channels} (leave channels unset)")
        missing = [s["file"] for s in meta.shards if not (self.root / s["file"]).is_file()]
        if missing:
            raise ValueError(f"latent cache '{self.root}' lacks shard(s) {', '.join(missing)} (re-run cache-latents to complete it)")
        for shard in meta.shards:  # one read of the cache at start: a flipped byte is never trained on
            if isinstance(shard.get("sha256"), str):
                verify_shard(self.root / shard["file"], shard["sha256"])
        self.latent_scale, self.vae = float(meta.latent_scale), meta.vae
        self.channels, self.resolution = meta.channels, meta.resolution
        self.num_classes = meta.num_classes if conditional else 0
        self.class_names = meta.class_names if conditional else None
        self.hflip = hflip
        self._starts = [0]  # first item of each shard, then the total
        for shard in meta.shards:
            self._starts.append(self._starts[-1] + int(shard["count"]))
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # memory maps are reopened in each worker
        return state

    def _shard(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = safe_open(str(self.root / self.meta.shards[index]["file"]), framework="pt")
        return self._handles[index]

    def __len__(self) -> int:
        return self._starts[-1]

    def raw(self, index: int) -> tuple[torch.Tensor, int]:
        """The stored, unscaled (2, C, h, w) latents ``[plain, flipped]`` and label of item ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        index %= len(self)
        shard = bisect.bisect_right(self._starts, index) - 1
        handle, offset = self._shard(shard), index - self._starts[shard]
        return handle.get_slice("latents")[offset], int(handle.get_slice("labels")[offset])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        latents, y = self.raw(index)  # (2, C, h, w)
        variant = int(torch.randint(FLIP_VARIANTS, ())) if self.hflip else 0
        x = latents[variant].to(torch.float32) * self.latent_scale  # (C, h, w)
        return x, label(y if self.num_classes else 0)
