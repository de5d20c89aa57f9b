"""The one place a recipe becomes objects: model, process, sampler, dataset, optimizer.

``diffit-toolkit recipe validate``, ``train``, ``sample``, ``bench``, ``ablate`` and the Python
API all go through these functions, so validating a recipe is building it without training and
can never disagree with training. Every name in a recipe resolves through a registry, and every
problem is a one-line [`RecipeError`][diffit_toolkit.recipe.RecipeError] naming the recipe key.

The data decide part of the model (image side, channels, classes):
[`data_facts`][diffit_toolkit.build.data_facts] reads
them from the dataset, and [`build_model`][diffit_toolkit.build.build_model] fills them in (a recipe
value that contradicts
the data is an error). Without the data (a recipe checked on a laptop before the data are
copied to the cluster), the model is checked with the recipe's own values and the backbone's
defaults, and [`check_recipe`][diffit_toolkit.build.check_recipe] says which checks it skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import torch

from diffit_toolkit.backbones import build_registered_backbone
from diffit_toolkit.data import DataConfig
from diffit_toolkit.errors import did_you_mean, first_line
from diffit_toolkit.optional import OPTIONAL, missing
from diffit_toolkit.process import Process, build_process as _build_process, resolve_sampler
from diffit_toolkit.recipe import Recipe, RecipeError, TrainSection, format_validation_error, parse_recipe, read_recipe
from diffit_toolkit.registry import PluginBuildError, PluginError, PluginLoadError, backbones


def _recipe_error(key: str, exc: BaseException) -> RecipeError:
    """``recipe error at <key>: <first line>`` (the message's own key when it names one); a plugin
    module that could not load is not the recipe's fault: its own line, naming the module. Raised
    ``from exc``: a plugin's own exception stays its cause, for ``--traceback``."""
    cause = exc.__cause__ if isinstance(exc, PluginBuildError) and exc.__cause__ is not None else exc
    message = first_line(cause)
    if isinstance(cause, PluginLoadError):
        return RecipeError(message)
    if not isinstance(cause, (PluginError, ValueError, TypeError)):
        message = f"{type(cause).__name__}: {message}"
    if message.startswith("recipe error"):
        return RecipeError(message)
    if message.startswith("at "):  # "at diffusion.learn_sigma: ..." from a plugin's check
        return RecipeError(f"recipe error {message}")
    return RecipeError(f"recipe error at {key}: {message}")


# -- data ----------------------------------------------------------------------------------------


def data_config(recipe: Recipe) -> DataConfig:
    """The recipe's data section as a typed [`DataConfig`][diffit_toolkit.data.config.DataConfig]
    (unknown keys are errors).

    A data path that does not exist yet is accepted here and checked when the dataset is built.
    """
    valid = [f.name for f in dataclasses.fields(DataConfig)]
    for key in recipe.data:
        if key not in valid:
            hint = did_you_mean(key, valid) or f" (valid: {', '.join(valid)})"
            raise RecipeError(f"recipe error at data.{key}: unknown key{hint}")
    try:
        config = pydantic.TypeAdapter(DataConfig).validate_python(dict(recipe.data))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        raise RecipeError(format_validation_error({**err, "loc": ("data", *err["loc"])})) from None
    if config.path is None or Path(config.path).expanduser().exists():
        try:
            config.validate()
        except ValueError as exc:
            raise _recipe_error("data", exc) from exc
    return config


def build_dataset(recipe: Recipe):
    """The recipe's training dataset."""
    config = data_config(recipe)
    try:
        return config.build()
    except (ValueError, OSError) as exc:
        raise _recipe_error("data", exc) from exc


def data_facts(dataset: Any) -> dict[str, Any]:
    """What the model and sampling need to know about the data (recorded in checkpoints)."""
    return {
        "num_classes": int(getattr(dataset, "num_classes", 0)),
        "channels": int(dataset.channels),
        "resolution": int(dataset.resolution),
        "class_names": getattr(dataset, "class_names", None),
        "latent_scale": getattr(dataset, "latent_scale", None),
        "vae": getattr(dataset, "vae", None),
    }


# -- model ---------------------------------------------------------------------------------------


def model_options(recipe: Recipe) -> tuple[str, str | None, dict[str, Any]]:
    """``(backbone name, preset, options)`` from the model section, with the learned-variance
    output set by what the process supports."""
    options = dict(recipe.model)
    backbone = options.pop("backbone", "latent_diffit")
    preset = options.pop("preset", None)
    if "learn_sigma" in type(recipe.diffusion).model_fields:  # the process can learn a variance
        options.setdefault("learn_sigma", recipe.diffusion.learn_sigma)
    elif options.get("learn_sigma"):
        raise RecipeError(
            f"recipe error at model.learn_sigma: the {recipe.diffusion.process} process does not use a "
            f"learned variance; set model.learn_sigma: false"
        )
    else:
        options["learn_sigma"] = False
    return backbone, preset, options


def complete_model_options(options: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, Any]:
    """Fill the model's data-shaped options from the data; a contradiction is a one-line error."""
    out = dict(options)
    for key, value in (("input_size", facts["resolution"]), ("in_channels", facts["channels"]),
                       ("num_classes", facts["num_classes"])):
        if key not in out:
            out[key] = value
        elif out[key] != value and not (key == "num_classes" and out[key] == 0):
            raise RecipeError(
                f"recipe error at model.{key}: the model has {out[key]} but the data has {value}; "
                f"set model.{key}: {value} (or remove it to take it from the data)"
            )
    return out


def build_model(recipe: Recipe, facts: Mapping[str, Any] | None = None, device: Any = None) -> torch.nn.Module:
    """The recipe's backbone, shaped for the data described by ``facts`` when given, on ``device``
    (``"meta"`` checks shapes without memory)."""
    name, preset, options = model_options(recipe)
    if facts is not None:
        options = complete_model_options(options, facts)
    try:
        with torch.device(device or "cpu"):
            return build_registered_backbone(name, preset, **options)
    except Exception as exc:  # a recipe value must never surface as a traceback from deep inside torch
        raise _recipe_error("model", exc) from exc


# -- process, sampler, optimizer -----------------------------------------------------------------


def build_process(recipe: Recipe) -> Process:
    """The recipe's diffusion process (its sampler checked too)."""
    try:
        resolve_sampler(recipe.diffusion.process, recipe.sample.sampler)
    except PluginError as exc:
        raise _recipe_error("sample.sampler", exc) from exc
    try:
        return _build_process(recipe.diffusion)
    except (PluginError, ValueError) as exc:
        raise _recipe_error("diffusion.process", exc) from exc


def lr_factor(train: TrainSection, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``train.lr``: linear
    warm-up over ``warmup_steps``, then constant or a cosine / linear decay that reaches
    ``min_lr_ratio`` at ``max_steps``."""
    if train.warmup_steps and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    span = max(1, train.max_steps - train.warmup_steps)
    done = min(1.0, (step - train.warmup_steps) / span)
    left = 0.5 * (1 + math.cos(math.pi * done)) if train.lr_schedule == "cosine" else 1.0 - done
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * left


def build_optimizer(recipe: Recipe, model: torch.nn.Module):
    """AdamW with the recipe's settings and its learning-rate schedule ([lr_factor][diffit_toolkit.build.lr_factor]):
    ``(optimizer, scheduler)``."""
    cfg = recipe.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    return optimizer, scheduler


# -- validation ----------------------------------------------------------------------------------


def check_recipe(recipe: Recipe, *, read_data: bool = False) -> list[str]:
    """Check everything that can go wrong before training: the process and its sampler, the logging
    back-ends it asks for (installed), the data
    section, and the model built on the meta device (shaped by the data when ``read_data`` and
    the data are there). Returns the checks that were skipped, as sentences."""
    skipped: list[str] = []
    build_process(recipe)
    for key, name in (("logging.wandb", "wandb"), ("logging.tensorboard", "tensorboard")):
        if getattr(recipe.logging, key.split(".")[1]) and missing(name) is not None:
            raise RecipeError(f"recipe error at {key}: needs {name}, which is not installed: "
                              f"pip install 'diffit-toolkit[{OPTIONAL[name][1]}]', or remove {key}")
    facts = None
    if recipe.data:
        config = data_config(recipe)
        if read_data:
            if config.path is None or Path(config.path).expanduser().exists():
                facts = data_facts(build_dataset(recipe))
            else:
                skipped.append(f"data path '{config.path}' is not here: the model was checked with the "
                               f"recipe's own input size, channels and classes, not the data's")
    build_model(recipe, facts, "meta")
    return skipped


def validate_recipe(data: Mapping[str, Any]) -> Recipe:
    """Validate a raw recipe dict: types, unknown keys, ranges, and the combinations only the built
    parts can check (model shape, windows, heads, process and sampler, data section)."""
    recipe = parse_recipe(data)
    check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, compose (``extends``), override (``--set``) and validate a recipe."""
    recipe = read_recipe(path, overrides)
    check_recipe(recipe)
    return recipe
