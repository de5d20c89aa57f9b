"""Sampling from a trained model: checkpoint -> model + process -> images (PNG grid, ADM ``.npz``).

Used by ``diffit-toolkit sample`` and by the trainer for its sample grids."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from diffit_toolkit.backbones import build_backbone, from_pretrained, is_pretrained_dir, save_pretrained
from diffit_toolkit.build import build_process
from diffit_toolkit.errors import first_line
from diffit_toolkit.process import Process
from diffit_toolkit.recipe import Recipe, SampleSection, parse_recipe
from diffit_toolkit.runs import CheckpointError, latest_checkpoint, load_checkpoint, parse_device, save_grid
from diffit_toolkit.sampling.noise import randn


@dataclass
class Generator:
    """A trained model ready to sample: weights, process, recipe and data facts."""

    model: torch.nn.Module
    process: Process
    recipe: Recipe
    facts: dict[str, Any]
    device: torch.device
    _decoder: tuple[Any, float | None] | None = field(default=None, init=False, repr=False)
    #: What the caller should be told about how these weights will sample (e.g. default settings).
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.facts["num_classes"])

    def labels(self, classes: list[int] | None, num_images: int) -> torch.Tensor | None:
        """Labels cycling through ``classes`` (default: all) in turn, ``None`` for unconditional models.

        Image ``i`` asks for ``classes[i % len(classes)]``: every run of ``len(classes)`` consecutive
        images holds every class once, so any batch, shard or leading part of the samples (a metric
        that scores the first ``n``) has the classes in equal share."""
        chosen = self.chosen_classes(classes)
        return None if chosen is None else self.label_slice(chosen, 0, num_images)

    def chosen_classes(self, classes: list[int] | None) -> list[int] | None:
        """The classes that take turns (``classes``, default all), checked; ``None`` for an
        unconditional model."""
        if not self.num_classes:
            if classes:
                raise ValueError("this model is unconditional: drop --classes")
            return None
        chosen = list(range(self.num_classes)) if not classes else list(classes)
        bad = [c for c in chosen if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is not one of the model's {self.num_classes} classes (0..{self.num_classes - 1})")
        return chosen

    def label_slice(self, chosen: list[int], start: int, count: int) -> torch.Tensor:
        """Labels of images ``start .. start + count`` when ``chosen`` take turns (image ``i`` asks
        for ``chosen[i % len(chosen)]``), made for that slice alone: memory does not grow with the
        total number of images."""
        index = torch.arange(start, start + count) % len(chosen)
        return torch.tensor(chosen)[index].to(self.device)

    def check_guidance(self, sample: SampleSection) -> None:
        """Refuse classifier-free guidance for a model whose null class was never trained."""
        config = getattr(self.model, "config", {})
        if self.num_classes and sample.guidance_scale != 1.0 and config.get("class_dropout_prob", 0.1) == 0:
            raise ValueError("this model was trained without label dropout (class_dropout_prob 0): its null class is "
                             "untrained, so classifier-free guidance is undefined; sample with --guidance-scale 1")

    def image_generators(self, seed: int, start: int, count: int) -> list[torch.Generator]:
        """One generator per image ``start .. start + count - 1``, seeded from ``(seed, index)``:
        an image's noise depends on its seed and index only, never on the batch it is drawn in."""
        if seed < 0:
            raise ValueError(f"the sampling seed must be >= 0, got {seed}")
        # SeedSequence mixes (seed, index) into 32 bits: the CPU generator keeps only 32 seed bits
        return [torch.Generator(device=self.device).manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                for i in range(start, start + count)]

    @torch.no_grad()
    def batches(self, num_images: int, sample: SampleSection, classes: list[int] | None = None,
                batch_size: int = 64, seed: int = 0,
                images: range | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield ``(images, labels)`` batches: images in [-1, 1] (decoded from latents when the data
        were latents), on the CPU as float32; only one batch is held at a time.

        Args:
            images: the indices to draw, a contiguous part of ``range(num_images)`` (default: all);
                image ``i`` is the same whichever part it is drawn in (see [`shard_range`][diffit_toolkit.generate.shard_range]).
        """
        images = range(num_images) if images is None else images
        if images.step != 1 or (len(images) and not 0 <= images.start < images.stop <= num_images):
            raise ValueError(f"images must be a contiguous part of range({num_images}), got {images}")
        chosen = self.chosen_classes(classes)
        size, channels = self.facts["resolution"], self.facts["channels"]
        null_class = getattr(self.model, "null_class", None)
        vae, scale = self.decoder()
        for start in range(images.start, images.stop, batch_size):
            n = min(batch_size, images.stop - start)
            y = None if chosen is None else self.label_slice(chosen, start, n)
            gens = self.image_generators(seed, start, n)
            noise = randn((n, channels, size, size), gens, self.device)
            x = self.process.sample(self.model, noise, y, sample, gens, null_class=null_class)
            if vae is not None:
                from diffit_toolkit.data import decode_latents

                x = decode_latents(vae, x, scale)
            yield x.float().clamp(-1, 1).cpu(), None if y is None else y.cpu()

    def decoder(self) -> tuple[Any, float | None]:
        """``(vae, latent scale)`` that turn the model's latents into images (loaded once), or
        ``(None, None)`` for a pixel model."""
        channels = self.facts["channels"]
        if channels not in (1, 3) and not self.facts.get("vae"):
            raise ValueError(f"the model makes {channels}-channel latents and no VAE is recorded: pass --vae FOLDER "
                             f"(the VAE that decodes them)")
        if not self.facts.get("vae"):
            return None, None
        if self._decoder is None:
            from diffit_toolkit.data import load_vae

            vae = load_vae(self.facts["vae"], device=self.device)
            self._decoder = (vae, self.facts.get("latent_scale") or float(vae.config.scaling_factor))
        return self._decoder

    def image_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of the images [`batches`][diffit_toolkit.generate.Generator.batches]
        yields: the model's side, or for a latent model the side its VAE decodes to (each of the
        VAE's down blocks after the first halves the side, as diffusers computes its scale factor)."""
        side = int(self.facts["resolution"])
        vae, _ = self.decoder()
        if vae is None:
            return side, side, int(self.facts["channels"])
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return side * factor, side * factor, int(vae.config.out_channels)

    def sample(self, num_images: int, sample: SampleSection, classes: list[int] | None = None,
               batch_size: int = 64, seed: int = 0,
               progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``num_images`` images in [-1, 1] as one tensor (for grids; large counts:
        [`batches`][diffit_toolkit.generate.Generator.batches]
        or [`write_samples`][diffit_toolkit.generate.write_samples]). Image ``i`` is the same
        whatever ``batch_size``.

        Args:
            progress: called with the number of images finished after every batch.
        """
        parts, done = [], 0
        for batch in self.batches(num_images, sample, classes, batch_size, seed):
            parts.append(batch)
            done += len(batch[0])
            if progress is not None:
                progress(done)
        labels = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return torch.cat([p[0] for p in parts]), labels


#: The sampling settings next to an exported model (``config.json`` + ``model.safetensors``).
SAMPLING_NAME = "sampling.json"
#: Recipe sections an export keeps: what sampling needs, not the data paths or training options.
EXPORTED_SECTIONS = ("name", "model", "diffusion", "sample")


def _facts_from_model(model: torch.nn.Module, vae: str | None) -> dict[str, Any]:
    """Data facts of a model file or folder that carries no run: its own input shape and classes."""
    cfg = model.config
    return {"num_classes": int(cfg.get("num_classes", 0)), "channels": int(cfg["in_channels"]),
            "resolution": int(cfg["input_size"]), "class_names": None, "latent_scale": None, "vae": vae}


def _bare_recipe(recipe: str | Path | None, model: torch.nn.Module) -> Recipe:
    """The recipe for weights that carry none: ``recipe`` (a file or shipped name) or the DiT defaults."""
    from diffit_toolkit.recipe import read_recipe

    parsed = read_recipe(recipe) if recipe is not None else Recipe()
    data = parsed.to_dict()
    if "learn_sigma" in data["diffusion"]:  # a process that can learn a variance: as the weights do
        data["diffusion"]["learn_sigma"] = bool(model.config.get("learn_sigma", False))
    return parse_recipe({**data, "data": {}})


def _is_diffusers_dir(path: Path) -> bool:
    """A diffusers model folder (any weights variant) or pipeline folder: read (or refused with the
    folder to pass) by [`read_diffusers_dit`][diffit_toolkit.interop.diffusers_dit.read_diffusers_dit]."""
    from diffit_toolkit.interop.diffusers_dit import is_diffusers_folder

    return is_diffusers_folder(path)


def _load_bare_file(path: Path) -> torch.nn.Module:
    """A toolkit model file, else released DiT / DiffiT / diffusers DiT weights (converted on load)."""
    from diffit_toolkit.runs.model_file import load_model_file, read_config

    try:
        read_config(path)
    except ValueError:
        from diffit_toolkit.interop.released import load_released

        return load_released(path)
    return load_model_file(path)


def load_generator(run_or_checkpoint: str | Path, device: str | None = None, weights: str = "ema",
                   recipe: str | Path | None = None, vae: str | None = None) -> Generator:
    """Load weights for sampling from any of:

    * a run folder (its newest checkpoint) or a checkpoint step folder (``ema`` or ``model`` weights);
    * an exported folder (``config.json`` + ``model.safetensors`` + ``sampling.json``);
    * a ``save_pretrained`` folder, a diffusers ``DiTTransformer2DModel`` folder or a single
      weights file (toolkit model file or released DiT / DiffiT / diffusers DiT weights): these
      carry no sampling settings, so ``recipe`` gives them (default:
      the DiT settings, Gaussian linear 1000 steps, epsilon prediction).

    Args:
        run_or_checkpoint: the path.
        device: ``cpu`` / ``cuda`` (default: CUDA when available).
        weights: ``ema`` or ``model`` (checkpoints only).
        recipe: a recipe whose ``diffusion`` and ``sample`` sections apply (required settings for
            bare weights; overrides an export's).
        vae: the VAE folder or hub id for a latent model (overrides the recorded one).
    """
    path = Path(run_or_checkpoint)
    if not path.exists():
        raise CheckpointError(f"no such {'file' if path.suffix else 'folder'}: {path}")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got '{weights}'")
    dev = parse_device(device)
    if path.is_file() or ((is_pretrained_dir(path) or _is_diffusers_dir(path)) and not (path / "state.pt").is_file()):
        if weights != "ema":
            raise ValueError(f"{path} holds one set of weights (exported or converted); the choice of 'model' or "
                             f"'ema' weights applies to checkpoints only: drop --weights")
        return _load_exported(path, dev, recipe, vae)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run folder {path} has no complete checkpoint yet")
        path = found
    ckpt = load_checkpoint(path, map_location=dev)
    config = ckpt["config"]
    lacking = [k for k in ("model", "recipe", "data") if not isinstance(config.get(k), dict)]
    if lacking:
        raise CheckpointError(f"checkpoint {path}: config.json has no {', '.join(lacking)} section; it was not "
                              f"written by the trainer")
    try:
        model = build_backbone(config["model"], source=f"checkpoint {path}").to(dev)
        model.load_state_dict(ckpt[weights])
        recipe_obj = parse_recipe({**config["recipe"], "data": {}}) if recipe is None else _bare_recipe(recipe, model)
        process = build_process(recipe_obj)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json does not describe its weights ({first_line(exc)})") from None
    model.eval()
    check_finite_weights(model, f"checkpoint {path} ({weights} weights)")
    facts = dict(config["data"])
    if vae is not None:
        facts["vae"] = vae
    return Generator(model, process, recipe_obj, facts, dev)


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse weights holding inf or nan (they sample black or noise images without any error)."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold inf or nan (first: {bad[0]}); they cannot "
                              f"sample: use an earlier checkpoint")


def _load_exported(path: Path, dev: torch.device, recipe: str | Path | None, vae: str | None) -> Generator:
    """An exported / ``save_pretrained`` folder or a single weights file."""
    if path.is_file():
        model = _load_bare_file(path)
    elif is_pretrained_dir(path):
        model = from_pretrained(path)
    else:  # a diffusers DiTTransformer2DModel folder
        from diffit_toolkit.interop.released import load_released

        model = load_released(path)
    settings_file = path / SAMPLING_NAME if path.is_dir() else None
    if settings_file is not None and settings_file.is_file() and recipe is None:
        try:
            saved = json.loads(settings_file.read_text())
            recipe_obj = parse_recipe({**saved["recipe"], "data": {}})
            facts = dict(saved["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{settings_file} does not describe the sampling settings ({first_line(exc)})") from None
        if vae is not None:
            facts["vae"] = vae
    else:
        recipe_obj = _bare_recipe(recipe, model)
        facts = _facts_from_model(model, vae)
    check_finite_weights(model, str(path))
    process = build_process(recipe_obj)
    notes = []
    if recipe is None and not (settings_file is not None and settings_file.is_file()):
        notes.append(f"{path} carries no sampling settings ({SAMPLING_NAME}): sampling with the default DiT "
                     f"settings ({recipe_obj.diffusion.process}, {recipe_obj.diffusion.schedule} schedule, "
                     f"{recipe_obj.diffusion.prediction} prediction); pass --recipe for the model's own")
    return Generator(model.to(dev).eval(), process, recipe_obj, facts, dev, notes=notes)


def read_weights(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The weights at ``path`` in the toolkit's key names, for ``train --init-from``: a run folder
    (newest checkpoint) or step folder (``weights``: ``ema`` or ``model``), a pretrained/exported
    folder, a toolkit model file, or released DiT / DiffiT / diffusers DiT weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such {'file' if path.suffix else 'folder'}: {path}")
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got '{weights}'")
    if path.is_file():
        return _load_bare_file(path).state_dict()
    if is_pretrained_dir(path) and not (path / "state.pt").is_file():
        from diffit_toolkit.backbones.pretrained import read_safetensors

        return read_safetensors(path / "model.safetensors")
    if _is_diffusers_dir(path):
        from diffit_toolkit.interop.released import load_released

        return load_released(path).state_dict()
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run folder {path} has no complete checkpoint yet")
        path = found
    return load_checkpoint(path)[weights]


def write_folder_atomically(out: str | Path, write: Callable[[Path], Any]) -> Path:
    """Create the folder ``out`` by ``write(tmp)`` into a temporary folder beside it, renamed to
    ``out`` once complete: ``out`` never holds a partial folder (a crash or a full disk leaves
    nothing, and a retry is not blocked); ``out`` must not exist or be an empty folder.

    Raises:
        CheckpointError: one line when the folder cannot be written (nothing is left behind).
        ValueError: as ``write`` raises it (nothing is left behind).
    """
    import shutil

    from diffit_toolkit.runs.files import temporary_name, why_write_failed

    out = Path(out)
    tmp = temporary_name(out)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        os.rename(tmp, out)  # fails rather than replace an existing export
    except ValueError:
        raise
    except Exception as exc:  # safetensors and torch wrap a full disk in their own exceptions
        raise CheckpointError(f"could not write {out} ({why_write_failed(exc, out.parent)}); nothing was written") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_model(generator: Generator, out: str | Path, extra: Callable[[Path], Any] | None = None) -> Path:
    """Write ``generator``'s weights as a pretrained folder plus ``sampling.json`` (the recipe's
    model, diffusion and sample sections and the data facts, with the VAE reference).

    The folder is written as [`write_folder_atomically`][diffit_toolkit.generate.write_folder_atomically]
    writes it; ``extra(folder)`` adds more files (the model card) before it gets its name."""
    check_finite_weights(generator.model, "the weights to export")

    def write(tmp: Path) -> None:
        save_pretrained(generator.model, tmp)
        recipe = generator.recipe.to_dict()
        settings = {"recipe": {k: recipe[k] for k in EXPORTED_SECTIONS}, "data": generator.facts}
        (tmp / SAMPLING_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return write_folder_atomically(out, write)


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


#: Images kept for the PNG grid of [`write_samples`][diffit_toolkit.generate.write_samples] (the ``.npz`` holds all of them).
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


def write_samples(generator: Generator, num_images: int, sample: SampleSection, *, npz: Path | None = None,
                  grid: Path | None = None, png_dir: Path | None = None, classes: list[int] | None = None,
                  batch_size: int = 64, seed: int = 0, progress: Callable[[int], None] | None = None, rank: int = 0,
                  world_size: int = 1, barrier: Callable[[], None] | None = None, source: str = "") -> list[Path]:
    """Sample ``num_images`` images straight to disk, one batch at a time.

    The ``.npz`` (ADM layout: ``arr_0`` uint8 NHWC, ``arr_1`` labels) is written batch by batch
    as uint8 into an ``.npy`` beside it and zipped at the end, so the memory held does not grow
    with ``num_images``; the grid shows the first ``GRID_MAX_IMAGES`` images. The ``.npz``
    appears under its name only once complete (written under a temporary name, then renamed).

    Several processes (``torchrun``): process ``rank`` of ``world_size`` draws the batches
    [`shard_range`][diffit_toolkit.generate.shard_range] gives it into a shard beside ``npz``; once ``barrier()`` returns on every
    rank (all shards written), rank 0 appends the shards in rank order, writes the ``.npz`` and the
    grid, and removes the shards. The ``.npz`` is the one a single process writes, byte for byte.

    ``png_dir`` receives one PNG per image, named by [`png_name`][diffit_toolkit.generate.png_name]
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
    generator.check_guidance(sample)
    if png_dir is not None:
        chosen = generator.chosen_classes(classes)
        check_png_dir(png_dir, {"source": source, "vae": generator.facts.get("vae"), "seed": seed, "classes": chosen,
                                "sample": sample.model_dump(mode="json")},
                      write=rank == 0)
        digits = max(PNG_INDEX_DIGITS, len(str(num_images - 1)))
        names = [png_name(i, None if chosen is None else chosen[i % len(chosen)], digits) for i in range(num_images)]
    height, width, _ = generator.image_shape()  # the decoded images' side for a latent model
    arrays = {"arr_0": ((height, width, 3), np.dtype(np.uint8))}
    if generator.num_classes:
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
            images, labels = next(generator.batches(num_images, sample, classes, batch_size, seed, images=batch))
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
                pixels = torch.from_numpy(np.array(first)).permute(0, 3, 1, 2)[:, : _image_channels(generator)]
                kept = [pixels.float() / 127.5 - 1]
                if "arr_1" in arrays:
                    kept_labels = [torch.from_numpy(np.array(np.load(_part_file(npz, "arr_1", 0, token), mmap_mode="r")[:GRID_MAX_IMAGES]))]
        if npz is not None:
            with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for key in arrays:
                    zf.write(_part_file(npz, key, 0, token), f"{key}.npy")
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


def _image_channels(generator: Generator) -> int:
    """Channels of the images ``generator`` makes: 3 when a VAE decodes its latents, else the model's."""
    return 3 if generator.facts.get("vae") else int(generator.facts["channels"])


def save_sample_grid(images: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
    """Grid with one row per distinct label (or square-ish when unconditional).

    The samples' labels take turns (``Generator.labels``): the grid keeps a whole number of turns
    and groups them by label (stable), so that each row shows one class."""
    if labels is None:
        return save_grid(images, path, rows=max(1, int(len(images) ** 0.5)))
    rows = len(torch.unique(labels))
    keep = max(rows, len(images) // rows * rows)
    order = torch.argsort(labels[:keep], stable=True)
    return save_grid(images[:keep][order], path, rows=rows)
