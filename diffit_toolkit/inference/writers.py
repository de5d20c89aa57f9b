"""Samples written to disk: the ADM ``.npz`` (one process or several), one PNG per image, and
the grid of a run's samples."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffit_toolkit.inference.pipeline import Pipeline
from diffit_toolkit.recipe import SampleSection
from diffit_toolkit.runs import save_grid


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C) as the ADM evaluator reads it (1 channel -> 3)."""
    x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_npz(images: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and, when conditional, ``arr_1`` (labels): the ADM layout."""
    from diffit_toolkit.runs.files import atomic_output

    arrays = {"arr_0": to_uint8_nhwc(images)}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    with atomic_output(path) as tmp:
        np.savez(tmp, **arrays)
    return path


#: Images kept for the PNG grid of [`write_samples`][diffit_toolkit.inference.writers.write_samples] (the ``.npz`` holds all of them).
GRID_MAX_IMAGES = 256
#: Bytes copied at a time when the shards of several processes are joined into one ``.npz``.
_COPY_CHUNK = 16 << 20


def shard_range(num_images: int, batch_size: int, rank: int, world_size: int) -> range:
    """The images process ``rank`` of ``world_size`` draws: a contiguous run of the batches a single
    process would draw (batch ``k`` holds images ``k * batch_size ..``), so every batch, and with it
    every image to the bit, is the same whatever the number of processes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    batches = -(-num_images // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return range(min(first * batch_size, num_images), min(last * batch_size, num_images))


def _part_file(npz: Path, key: str, rank: int, token: str = "") -> Path:
    """Where a rank streams one array of the ``.npz``: rank 0 into the whole array, the others into a
    shard; ``token`` names the writing launch, so two samplings to one path never share a file."""
    stem = f"{npz.name}.{token}" if token else npz.name
    return npz.with_name(f"{stem}.{key}.tmp" if rank == 0 else f"{stem}.rank{rank}.{key}.tmp")


def _writer_token(world_size: int) -> str:
    """A name for this sampling's temporary files that no other sampling shares: this process's
    own, or under torchrun rank 0's, sent to every rank (a collective). Ranks that share no process
    group (called in turn in one process) use the plain names."""
    import os
    import secrets

    import torch.distributed as dist

    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    if world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            return ""
        box = [token]
        dist.broadcast_object_list(box, src=0)
        token = box[0]
    return token


def _open_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """An ``.npy`` file opened to receive its rows one batch at a time (the header, for ``shape``, first)."""
    handle = open(path, "wb")
    np.lib.format.write_array_header_1_0(handle, {"descr": dtype.str, "fortran_order": False, "shape": shape})
    return handle


def _append_rows(target: Any, shard: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Copy the rows of the ``.npy`` file ``shard`` (checked to hold ``shape``) to the end of ``target``."""
    import shutil

    with open(shard, "rb") as src:
        np.lib.format.read_magic(src)
        found, _, _ = np.lib.format.read_array_header_1_0(src)
        body = shard.stat().st_size - src.tell()
        if tuple(found) != shape or body != int(np.prod(shape)) * dtype.itemsize:
            raise OSError(f"the shard {shard} holds {body} bytes of shape {found}, not {shape}: its process did not finish it")
        shutil.copyfileobj(src, target, _COPY_CHUNK)


def write_samples(pipeline: Pipeline, num_images: int, sample: SampleSection, *, npz: Path | None = None,
                  grid: Path | None = None, png_dir: Path | None = None, classes: list[int] | None = None,
                  batch_size: int = 64, seed: int = 0, progress: Callable[[int], None] | None = None, rank: int = 0,
                  world_size: int = 1, barrier: Callable[[], None] | None = None, source: str = "") -> list[Path]:
    """Sample ``num_images`` images straight to disk, one batch at a time.

    The ``.npz`` (ADM layout: ``arr_0`` uint8 NHWC, ``arr_1`` labels) is written batch by batch
    as uint8 into an ``.npy`` beside it and zipped at the end, so the memory held does not grow
    with ``num_images``; the grid shows the first ``GRID_MAX_IMAGES`` images. The ``.npz``
    appears under its name only once complete (written under a temporary name, then renamed).

    Several processes (``torchrun``): process ``rank`` of ``world_size`` draws the batches
    [`shard_range`][diffit_toolkit.inference.writers.shard_range] gives it into a shard beside ``npz``; once ``barrier()`` returns on every
    rank (all shards written), rank 0 appends the shards in rank order, writes the ``.npz`` and the
    grid, and removes the shards. The ``.npz`` is the one a single process writes, byte for byte.

    ``png_dir`` receives one PNG per image, named by [`png_name`][diffit_toolkit.inference.writers.png_name]
    (index and class), each written under a temporary name and renamed once complete. A rerun
    skips the images already there (with neither ``npz`` nor ``grid``, their batches are not even
    drawn) and draws the same images for the others; the folder's ``sampling_settings.json``
    records the settings, and a rerun with other settings is refused.

    Args:
        progress: called with the number of this process's images finished after every batch.
        source: the weights sampled (recorded in ``png_dir``'s settings).
        rank: this process (0 in a plain run).
        world_size: the number of processes (1: a plain run).
        barrier: returns once every process has called it (required with ``world_size > 1``).

    Returns:
        The files written (none on ranks other than 0).
    """
    import zipfile

    from diffit_toolkit.runs.files import temporary_name

    part = shard_range(num_images, batch_size, rank, world_size)
    distributed = world_size > 1
    if distributed and npz is None and png_dir is None:
        raise ValueError("sampling on several processes writes an .npz or PNG files: give --npz PATH or --png-dir DIR")
    if distributed and npz is None and grid is not None:
        raise ValueError("the grid of a sampling on several processes is drawn from its .npz: add --npz PATH or drop --out")
    if distributed and npz is not None and barrier is None:
        raise ValueError("sampling on several processes into one .npz needs a barrier")
    pipeline.check_guidance(sample)
    if png_dir is not None:
        chosen = pipeline.chosen_classes(classes)
        check_png_dir(png_dir, {"source": source, "vae": pipeline.facts.get("vae"), "seed": seed, "classes": chosen,
                                "sample": sample.model_dump(mode="json")},
                      write=rank == 0)
        digits = max(PNG_INDEX_DIGITS, len(str(num_images - 1)))
        names = [png_name(i, None if chosen is None else chosen[i % len(chosen)], digits) for i in range(num_images)]
    height, width, _ = pipeline.image_shape()  # the decoded images' side for a latent model
    arrays = {"arr_0": ((height, width, 3), np.dtype(np.uint8))}
    if pipeline.num_classes:
        arrays["arr_1"] = ((), np.dtype(np.int64))
    files: dict[str, Any] = {}
    kept: list[torch.Tensor] = []
    kept_labels: list[torch.Tensor] = []
    done = 0
    written: list[Path] = []
    handed_over = False  # every rank has finished its shard: rank 0 owns them all (and removes them)
    token = _writer_token(world_size) if npz is not None else ""
    zipped = temporary_name(npz) if npz is not None else None
    try:
        if npz is not None:
            npz.parent.mkdir(parents=True, exist_ok=True)
            rows = num_images if rank == 0 else len(part)  # rank 0's file becomes the whole array
            for key, (shape, dtype) in arrays.items():
                files[key] = _open_npy(_part_file(npz, key, rank, token), (rows, *shape), dtype)
        for start in range(part.start, part.stop, batch_size):
            batch = range(start, min(start + batch_size, part.stop))
            if png_dir is not None and npz is None and grid is None and all((png_dir / names[i]).is_file() for i in batch):
                done += len(batch)  # drawn by an earlier run: the same images
                if progress is not None:
                    progress(done)
                continue
            images, labels = next(pipeline.batches(num_images, sample, classes, batch_size, seed, images=batch))
            pixels = to_uint8_nhwc(images) if files or png_dir is not None else None
            if png_dir is not None:
                _write_pngs(pixels, [png_dir / names[i] for i in batch])
            if files:
                if pixels.shape[1:] != arrays["arr_0"][0]:  # a header that lies makes every reader return garbage
                    raise ValueError(f"the sampler made images of {pixels.shape[1:]}, not the {arrays['arr_0'][0]} "
                                     f"the .npz declares")
                files["arr_0"].write(pixels.tobytes())
                if labels is not None:
                    files["arr_1"].write(labels.numpy().astype(np.int64).tobytes())
            if grid is not None and not distributed and done < GRID_MAX_IMAGES:
                kept.append(images[: GRID_MAX_IMAGES - done])
                if labels is not None:
                    kept_labels.append(labels[: GRID_MAX_IMAGES - done])
            done += len(images)
            if progress is not None:
                progress(done)
        for handle in files.values():
            handle.close()
        if distributed and npz is not None:
            barrier()
            handed_over = True
            if rank != 0:
                return []
            for other in range(1, world_size):
                count = len(shard_range(num_images, batch_size, other, world_size))
                for key, (shape, dtype) in arrays.items():
                    with open(_part_file(npz, key, 0, token), "ab") as target:
                        _append_rows(target, _part_file(npz, key, other, token), (count, *shape), dtype)
            if grid is not None:
                first = np.load(_part_file(npz, "arr_0", 0, token), mmap_mode="r")[:GRID_MAX_IMAGES]
                pixels = torch.from_numpy(np.array(first)).permute(0, 3, 1, 2)[:, : _image_channels(pipeline)]
                kept = [pixels.float() / 127.5 - 1]
                if "arr_1" in arrays:
                    kept_labels = [torch.from_numpy(np.array(np.load(_part_file(npz, "arr_1", 0, token), mmap_mode="r")[:GRID_MAX_IMAGES]))]
        if npz is not None:
            with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key in arrays:
                    _store(zf, _part_file(npz, key, 0, token), f"{key}.npy")
            zipped.replace(npz)
            written.append(npz)
    finally:
        for handle in files.values():
            handle.close()
        if npz is not None and (rank == 0 or not handed_over):
            ranks = range(world_size) if handed_over else [rank]  # after the barrier rank 0 removes every shard
            for key in arrays:
                for r in ranks:
                    _part_file(npz, key, r, token).unlink(missing_ok=True)
            zipped.unlink(missing_ok=True)
    if png_dir is not None and rank == 0:
        written.append(png_dir)
    if grid is not None:
        written.append(save_sample_grid(torch.cat(kept), torch.cat(kept_labels) if kept_labels else None, grid))
    return written


def _store(zf: Any, source: Path, name: str) -> None:
    """Add ``source`` to ``zf`` as ``name``, with a fixed date and mode, so that the same samples
    give the same ``.npz`` bytes whenever and however many processes write them."""
    import shutil
    import zipfile

    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    with open(source, "rb") as src, zf.open(info, "w", force_zip64=source.stat().st_size >= zipfile.ZIP64_LIMIT) as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


#: Least digits of the image index in a PNG file name (``0000042_class3.png``): names sort in drawing order.
PNG_INDEX_DIGITS = 7
#: The file in a PNG folder recording the settings its images were drawn with.
PNG_SETTINGS = "sampling_settings.json"


def png_name(index: int, label: int | None, width: int = PNG_INDEX_DIGITS) -> str:
    """``0000042_class3.png`` (``0000042.png`` for an unconditional model): the index, then the class."""
    return f"{index:0{width}d}.png" if label is None else f"{index:0{width}d}_class{label}.png"


def check_png_dir(png_dir: Path, settings: dict[str, Any], write: bool = True) -> None:
    """Create ``png_dir`` or check that the images already in it were drawn with ``settings``;
    record them (when ``write``) for the next run.

    Raises:
        ValueError: one line when the folder holds images drawn with other settings (they would
            mix with these), or is a file.
    """
    from diffit_toolkit.runs.files import write_text_atomic

    if png_dir.exists() and not png_dir.is_dir():
        raise ValueError(f"--png-dir {png_dir} is a file; give a folder")
    record = png_dir / PNG_SETTINGS
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except ValueError:
            before = None
        if before != json.loads(json.dumps(settings)):
            changed = sorted(k for k in settings if not isinstance(before, dict) or before.get(k) != json.loads(json.dumps(settings[k])))
            raise ValueError(f"--png-dir {png_dir} holds images drawn with other settings ({', '.join(changed) or PNG_SETTINGS}): "
                             f"give a new folder, or the same settings to complete it")
    elif png_dir.is_dir() and any(p.suffix.lower() == ".png" for p in png_dir.iterdir()):
        raise ValueError(f"--png-dir {png_dir} holds PNG files that diffit-toolkit sample did not draw (no {PNG_SETTINGS}): "
                         f"give a new or empty folder")
    png_dir.mkdir(parents=True, exist_ok=True)
    if write:
        write_text_atomic(record, json.dumps(settings, indent=2) + "\n")


def _write_pngs(pixels: np.ndarray, paths: list[Path]) -> None:
    """One PNG per image (uint8 HWC), each under a temporary name renamed once complete; files
    already there (a rerun) are kept."""
    from PIL import Image

    from diffit_toolkit.runs.files import atomic_output

    for image, path in zip(pixels, paths):
        if path.is_file():
            continue
        with atomic_output(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")


def _image_channels(pipeline: Pipeline) -> int:
    """Channels of the images ``pipeline`` makes: 3 when a VAE decodes its latents, else the model's."""
    return 3 if pipeline.facts.get("vae") else int(pipeline.facts["channels"])


def save_sample_grid(images: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
    """Grid with one row per distinct label (or square-ish when unconditional).

    The samples' labels take turns ([`Pipeline.labels`][diffit_toolkit.inference.pipeline.Pipeline.labels]): the grid keeps a whole number of turns
    and groups them by label (stable), so that each row shows one class."""
    if labels is None:
        return save_grid(images, path, rows=max(1, int(len(images) ** 0.5)))
    rows = len(torch.unique(labels))
    keep = max(rows, len(images) // rows * rows)
    order = torch.argsort(labels[:keep], stable=True)
    return save_grid(images[:keep][order], path, rows=rows)
