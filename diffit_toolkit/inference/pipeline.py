"""A trained model ready to sample: weights, diffusion process, recipe and data facts.

[`load_pipeline`][diffit_toolkit.inference.pipeline.load_pipeline] reads a run, a checkpoint,
an exported folder or released weights; [`Pipeline`][diffit_toolkit.inference.pipeline.Pipeline]
draws images from it. Used by ``diffit-toolkit sample``, ``export`` and ``eval`` and by the
trainer for its sample grids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from diffit_toolkit.backbones import build_backbone
from diffit_toolkit.build import build_process
from diffit_toolkit.errors import first_line
from diffit_toolkit.interop.weights import (
    CHECKPOINT,
    check_finite_weights,
    check_weights_choice,
    checkpoint_folder,
    load_model,
    weights_format,
)
from diffit_toolkit.process import Process
from diffit_toolkit.recipe import Recipe, SampleSection, parse_recipe
from diffit_toolkit.runs import CheckpointError, load_checkpoint, parse_device
from diffit_toolkit.sampling.noise import randn

#: The sampling settings next to an exported model (``config.json`` + ``model.safetensors``).
SAMPLING_NAME = "sampling.json"


@dataclass
class Pipeline:
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
                image ``i`` is the same whichever part it is drawn in (see [`shard_range`][diffit_toolkit.inference.writers.shard_range]).
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
        """``(height, width, channels)`` of the images [`batches`][diffit_toolkit.inference.pipeline.Pipeline.batches]
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
        [`batches`][diffit_toolkit.inference.pipeline.Pipeline.batches]
        or [`write_samples`][diffit_toolkit.inference.writers.write_samples]). Image ``i`` is the same
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


def load_pipeline(run_or_checkpoint: str | Path, device: str | None = None, weights: str = "ema",
                  recipe: str | Path | None = None, vae: str | None = None) -> Pipeline:
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
    fmt = weights_format(path)
    check_weights_choice(weights)
    dev = parse_device(device)
    if fmt != CHECKPOINT:
        if weights != "ema":
            raise ValueError(f"{path} holds one set of weights (exported or converted); the choice of 'model' or "
                             f"'ema' weights applies to checkpoints only: drop --weights")
        return _load_exported(path, fmt, dev, recipe, vae)
    path = checkpoint_folder(path)
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
    return Pipeline(model, process, recipe_obj, facts, dev)


def _load_exported(path: Path, fmt: str, dev: torch.device, recipe: str | Path | None, vae: str | None) -> Pipeline:
    """An exported / ``save_pretrained`` folder, a diffusers folder or a single weights file."""
    model = load_model(path, fmt)
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
    return Pipeline(model.to(dev).eval(), process, recipe_obj, facts, dev, notes=notes)
