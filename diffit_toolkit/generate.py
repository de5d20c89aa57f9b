"""Sampling from a trained model: checkpoint -> model + process -> images (PNG grid, ADM ``.npz``).

Used by ``diffit-toolkit sample`` and by the trainer for its sample grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffit_toolkit.backbones import build_backbone
from diffit_toolkit.build import build_process
from diffit_toolkit.errors import first_line
from diffit_toolkit.process import Process
from diffit_toolkit.recipe import Recipe, SampleSection, parse_recipe
from diffit_toolkit.runs import CheckpointError, latest_checkpoint, load_checkpoint, parse_device, save_grid


@dataclass
class Generator:
    """A trained model ready to sample: weights, process, recipe and data facts."""

    model: torch.nn.Module
    process: Process
    recipe: Recipe
    facts: dict[str, Any]
    device: torch.device

    @property
    def num_classes(self) -> int:
        return int(self.facts["num_classes"])

    def labels(self, classes: list[int] | None, num_images: int) -> torch.Tensor | None:
        """Labels cycling through ``classes`` (default: all), ``None`` for unconditional models."""
        if not self.num_classes:
            if classes:
                raise ValueError("this model is unconditional: drop --classes")
            return None
        chosen = list(range(self.num_classes)) if not classes else classes
        bad = [c for c in chosen if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"class {bad[0]} is not one of the model's {self.num_classes} classes (0..{self.num_classes - 1})")
        per = -(-num_images // len(chosen))
        return torch.tensor(chosen, device=self.device).repeat_interleave(per)[:num_images]

    @torch.no_grad()
    def sample(self, num_images: int, sample: SampleSection, classes: list[int] | None = None,
               batch_size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``num_images`` images in [-1, 1] (decoded from latents when the data were latents)."""
        y_all = self.labels(classes, num_images)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        size, channels = self.facts["resolution"], self.facts["channels"]
        null_class = getattr(self.model, "null_class", None)
        vae = None
        if self.facts.get("latent_scale"):
            from diffit_toolkit.data import load_vae

            vae = load_vae(self.facts["vae"], device=self.device)
        out = []
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)
            y = None if y_all is None else y_all[start : start + n]
            noise = torch.randn((n, channels, size, size), generator=gen, device=self.device)
            x = self.process.sample(self.model, noise, y, sample, gen, null_class=null_class)
            if vae is not None:
                from diffit_toolkit.data import decode_latents

                x = decode_latents(vae, x, self.facts["latent_scale"])
            out.append(x.float().clamp(-1, 1).cpu())
        return torch.cat(out), None if y_all is None else y_all.cpu()


def load_generator(run_or_checkpoint: str | Path, device: str | None = None, weights: str = "ema") -> Generator:
    """Load a run folder (its newest checkpoint) or a checkpoint folder for sampling."""
    path = Path(run_or_checkpoint)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run folder {path} has no complete checkpoint yet")
        path = found
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got '{weights}'")
    dev = parse_device(device)
    ckpt = load_checkpoint(path, map_location=dev)
    config = ckpt["config"]
    lacking = [k for k in ("model", "recipe", "data") if not isinstance(config.get(k), dict)]
    if lacking:
        raise CheckpointError(f"checkpoint {path}: config.json has no {', '.join(lacking)} section; it was not "
                              f"written by the trainer")
    try:
        model = build_backbone(config["model"]).to(dev)
        model.load_state_dict(ckpt[weights])
        recipe = parse_recipe({**config["recipe"], "data": {}})
        process = build_process(recipe)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json does not describe its weights ({first_line(exc)})") from None
    model.eval()
    return Generator(model, process, recipe, config["data"], dev)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, C, H, W) -> uint8 (B, H, W, C) as the ADM evaluator reads it (1 channel -> 3)."""
    x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_npz(images: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
    """Write ``arr_0`` (uint8 NHWC) and, when conditional, ``arr_1`` (labels): the ADM layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": to_uint8_nhwc(images)}
    if labels is not None:
        arrays["arr_1"] = labels.numpy().astype(np.int64)
    np.savez(path, **arrays)
    return path


def save_sample_grid(images: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
    """Grid with one row per distinct label (or square-ish when unconditional)."""
    rows = len(torch.unique(labels)) if labels is not None else max(1, int(len(images) ** 0.5))
    return save_grid(images, path, rows=rows)
