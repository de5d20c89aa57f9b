"""Recipes: YAML files validated into typed objects.

A recipe names a backbone preset plus overrides, a diffusion process, a dataset, training and
sampling settings. ``extends:`` composes recipes (a path relative to the file, or a list of
them; later files and the recipe itself override earlier ones, dictionaries merge key by key);
``--set a.b=c`` overrides one value from the command line (the value is parsed as YAML).

Every problem is a one-line :class:`RecipeError` with the key path and a hint, e.g.
``recipe error at train.bach_size: unknown key; did you mean 'batch_size'?``.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from diffit_toolkit.errors import did_you_mean

#: Where the shipped recipes live: the package ``diffit_toolkit.recipes`` (``recipes/`` in a source
#: checkout, installed inside the package by a wheel).
RECIPES_DIR = Path(str(importlib.resources.files("diffit_toolkit.recipes")))


class RecipeError(ValueError):
    """A recipe problem, one line, with the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiffusionSection(_Section):
    """The diffusion process.

    Attributes:
        process: a registered diffusion process: ``gaussian`` (ADM/DiT), ``edm`` (Karras et al.)
            or ``flow`` (linear-interpolant flow matching); see ``diffit-toolkit plugins``.
        schedule: Gaussian beta schedule, ``linear`` or ``cosine``.
        num_timesteps: Gaussian training steps (1000).
        prediction: Gaussian model output, ``eps``, ``x0`` or ``v``.
        learn_sigma: Gaussian learned-range variance with the hybrid MSE + VLB loss (the model
            then outputs 2C channels).
        precond: EDM preconditioning, ``edm``, ``vp`` or ``ve``.
        sigma_data: EDM data standard deviation.
    """

    process: str = "gaussian"
    schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = Field(1000, gt=0)
    prediction: Literal["eps", "x0", "v"] = "eps"
    learn_sigma: bool = True
    precond: Literal["edm", "vp", "ve"] = "edm"
    sigma_data: float = Field(0.5, gt=0)


class TrainSection(_Section):
    """Optimisation and bookkeeping.

    Attributes:
        batch_size: global batch size (split over processes).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear learning-rate warmup.
        grad_clip: clip the global gradient norm (``null``: off).
        ema_decay: EMA decay of the weights used for sampling.
        ema_warmup: ramp the decay as ``min(ema_decay, (1 + n) / (10 + n))`` after n updates, so
            short runs average recent weights (DiT and the paper: off, a fixed 0.9999).
        max_steps: training steps.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (mixed precision applies on GPU).
        tf32: allow TF32 matmuls on GPU.
        compile: ``torch.compile`` the model.
        seed: global seed.
        num_workers: data-loader workers per process.
        log_every: steps between metric lines.
        sample_every: steps between EMA sample grids (0: only at the end).
        ckpt_every: steps between checkpoints (0: only at the end).
        keep_last: checkpoints kept.
        max_bad_steps: consecutive steps with a NaN/inf loss or gradient that are skipped before
            the run stops (with a message naming the step and the last good checkpoint).
    """

    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    ema_warmup: bool = False
    max_steps: int = Field(400_000, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True
    compile: bool = False
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(50, gt=0)
    sample_every: int = Field(0, ge=0)
    ckpt_every: int = Field(0, ge=0)
    keep_last: int = Field(3, gt=0)
    max_bad_steps: int = Field(10, gt=0)


class SampleSection(_Section):
    """Sampling and guidance (used for the grids during training and by ``diffit-toolkit sample``).

    Attributes:
        sampler: a sampler registered for the process: ``ddpm``, ``ddim``, ``dpm_solver++``,
            ``diffusers:<SchedulerClass>`` (Gaussian), ``heun`` (EDM), ``euler`` / ``heun`` (flow).
        steps: sampling steps (Gaussian: respaced steps of the training schedule).
        eta: DDIM stochasticity.
        guidance_scale: classifier-free guidance scale (1: off).
        guidance_schedule: ``constant`` or ``power_cosine`` (DiffiT at 256 px).
        guidance_power: exponent ``p`` of the power-cosine schedule.
        guided_channels: guide only the first k output channels (DiffiT/DiT: 3 of 4); ``null``: all.
        guidance_interval: guide only at noise levels in [lo, hi] (1: pure noise, 0: data; for
            every process, about that fraction of the sampling steps).
        num_images: images in a sample grid.
        clip_denoised: clip the Gaussian samplers' x_0 estimate to [-1, 1] (pixel data; not latents).
        seed: sampling seed.
    """

    sampler: str = "ddpm"
    steps: int = Field(250, gt=0)
    eta: float = Field(0.0, ge=0)
    guidance_scale: float = Field(1.0, ge=0)
    guidance_schedule: Literal["constant", "power_cosine"] = "constant"
    guidance_power: float = 4.0
    guided_channels: int | None = Field(None, gt=0)
    guidance_interval: tuple[float, float] | None = None
    num_images: int = Field(64, gt=0)
    clip_denoised: bool = False
    seed: int = 0


class Recipe(_Section):
    """A resolved, validated recipe.

    Attributes:
        name: run name (the run folder defaults to ``runs/<name>``).
        description: free text.
        output_dir: run folder.
        model: ``backbone`` (registered name), ``preset``, and any option of that backbone
            (``mechanism``, ``mechanism_options``, ``window``, ...); validated by building the model
            on the meta device.
        diffusion: :class:`DiffusionSection`.
        data: options of the dataset (``kind``, ``path``, ...), validated against the data config.
        train: :class:`TrainSection`.
        sample: :class:`SampleSection`.
    """

    name: str = "run"
    description: str = ""
    output_dir: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    data: dict[str, Any] = Field(default_factory=dict)
    train: TrainSection = Field(default_factory=TrainSection)
    sample: SampleSection = Field(default_factory=SampleSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-ready dict of the whole recipe."""
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading -----------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist: check the path (shipped recipes are in {RECIPES_DIR})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"recipe {path}:{where}: YAML syntax error ({problem}); fix the YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe at ``path`` as a dict, with its ``extends:`` chain merged in (not validated)."""
    path = resolve_recipe_path(path)
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"recipe extends itself in a cycle: {chain}; remove one 'extends'")
    data = _read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"recipe {path}: 'extends' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, load_raw(path.parent / parent, (*_seen, path)))
    return deep_merge(merged, data)


def resolve_recipe_path(path: str | Path) -> Path:
    """A path as given, else the shipped recipe of that name (``quickstart`` or ``quickstart.yaml``)."""
    path = Path(path)
    if path.is_file():
        return path.resolve()
    for candidate in (RECIPES_DIR / path.name, RECIPES_DIR / f"{path.name}.yaml"):
        if not path.parent.parts and candidate.is_file():
            return candidate.resolve()
    return path


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML: ``train.lr=3e-4``, ``model.window=null``)."""
    out = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override '{item}' is not of the form key.path=value (e.g. train.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                path = ".".join(parts[: i + 1])
                raise RecipeError(f"override '{item}': {path} is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def format_validation_error(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``recipe error at <key path>: <message>``."""
    loc = [str(p) for p in error["loc"]]
    path = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        section_model = Recipe
        for part in loc[:-1]:
            field = section_model.model_fields.get(part)
            annotation = getattr(field, "annotation", None)
            section_model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if section_model is None:
                break
        valid = list(section_model.model_fields) if section_model else []
        hint = did_you_mean(loc[-1], valid) or (f" (valid: {', '.join(valid)})" if valid else "")
        return f"recipe error at {path}: unknown key{hint}"
    value = error.get("input")
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return f"recipe error at {path}: {error['msg'][0].lower() + error['msg'][1:]} (got {shown})"


def parse_recipe(data: Mapping[str, Any]) -> Recipe:
    """Type-check a raw recipe dict into a :class:`Recipe` (types, unknown keys, value ranges).

    What only the built parts can check (model shapes, process and sampler, data) is
    :func:`diffit_toolkit.build.check_recipe`; ``diffit_toolkit.build.load_recipe`` does both.
    """
    try:
        return Recipe.model_validate(dict(data))
    except pydantic.ValidationError as exc:
        raise RecipeError(format_validation_error(exc.errors()[0])) from None


def read_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, compose (``extends``), override (``--set``) and type-check a recipe file."""
    return parse_recipe(apply_overrides(load_raw(path), overrides))
