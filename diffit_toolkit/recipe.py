"""Recipes: YAML files validated into typed objects.

A recipe names a backbone preset plus overrides, a diffusion process, a dataset, training and
sampling settings. ``extends:`` composes recipes (a path relative to the file, or a list of
them; later files and the recipe itself override earlier ones, dictionaries merge key by key);
``--set a.b=c`` overrides one value from the command line (the value is parsed as YAML).

Every problem is a one-line [`RecipeError`][diffit_toolkit.recipe.RecipeError] with the key path and
a hint, e.g.
``recipe error at train.bach_size: unknown key; did you mean 'batch_size'?``.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationInfo, field_validator

from diffit_toolkit.errors import UsageError, did_you_mean, first_line

#: Where the shipped recipes live: the package ``diffit_toolkit.recipes`` (``recipes/`` in a source
#: checkout, installed inside the package by a wheel).
RECIPES_DIR = Path(str(importlib.resources.files("diffit_toolkit.recipes")))


#: Largest recipe file read (a real recipe is a few KiB; pure-Python YAML takes seconds per MiB).
MAX_RECIPE_BYTES = 256 * 1024
#: How many recipe files one ``extends:`` chain may stack, and read in all.
MAX_EXTENDS_DEPTH, MAX_EXTENDS_FILES = 16, 64
#: Largest ``--set`` value.
MAX_OVERRIDE_CHARS = 4096
#: Upper bounds of the model section's sizes (per key; lists are bounded element-wise), so that a
#: typo such as ``depth: 100000000`` is an error rather than a build that never ends.
MODEL_LIMITS: dict[str, int | float] = {
    "depth": 1024, "num_blocks": 1024, "hidden_size": 65536, "channels": 65536, "time_dim": 65536,
    "head_dim": 4096, "num_heads": 4096, "input_size": 8192, "patch_size": 1024, "window": 8192,
    "in_channels": 4096, "num_classes": 1_000_000, "mlp_ratio": 256,
}
#: Bound of any other number in the model and data sections, and of list lengths there.
MAX_OPTION_NUMBER = 2**24
MAX_OPTION_ITEMS = 256


class RecipeError(UsageError, ValueError):
    """A recipe problem, one line, with the key path."""


def _takes_int(annotation: Any) -> bool:
    """True for ``int`` and unions holding ``int`` but not ``bool`` (``int | None``)."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return int in members and bool not in members


class _Section(BaseModel):
    # allow_inf_nan=False: ``lr: .inf`` or ``guidance_scale: nan`` are errors, not silent garbage
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``max_steps: true`` (YAML's yes/no/true/false) is an error, not the number 1 or 0."""
        if isinstance(value, bool) and _takes_int(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a whole number, not a boolean")
        return value


class ProcessOptions(_Section):
    """The recipe's ``diffusion`` section: the process and its options.

    Each diffusion process declares its options as a subclass (its ``Options`` class attribute,
    see [`Process`][diffit_toolkit.process.Process]); the section is validated against the chosen
    process's class, so a key that process does not take is a one-line error naming its valid
    keys. The built-in processes' options (``GaussianOptions``, ``EDMOptions`` in
    ``diffit_plugins.processes``): ``gaussian``: ``schedule`` (``linear``, ``cosine``),
    ``num_timesteps`` (1000), ``prediction`` (``eps``, ``x0``, ``v``), ``learn_sigma`` (true:
    the learned-range variance with the hybrid loss), ``min_snr_gamma`` (``null``: unweighted);
    ``edm``: ``precond`` (``edm``, ``vp``, ``ve``), ``sigma_data`` (0.5); ``flow``: none.

    Attributes:
        process: a registered diffusion process: ``gaussian`` (ADM/DiT), ``edm`` (Karras et al.)
            or ``flow`` (linear-interpolant flow matching); see ``diffit-toolkit plugins``.
    """

    process: str = "gaussian"


#: The ``diffusion`` keys of every saved recipe from before each process declared its own
#: options, with the values they held when a recipe did not set them (``learn_sigma``: either, as
#: a process without a learned variance never used it). A saved recipe of another process still
#: reads: such a key is dropped when it holds one of these values (and refused otherwise).
EARLIER_DIFFUSION_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "schedule": ("linear",), "num_timesteps": (1000,), "prediction": ("eps",), "learn_sigma": (True, False),
    "precond": ("edm",), "sigma_data": (0.5,), "min_snr_gamma": (None,),
}


def process_options(section: Any) -> ProcessOptions:
    """The ``diffusion`` section validated against its process's declared options.

    Raises:
        RecipeError: one line: an unknown process, a key the process does not take (with its
            valid keys), or a value out of range.
    """
    from diffit_toolkit.registry import PluginError, PluginLoadError, processes

    if isinstance(section, ProcessOptions):
        return section
    if not isinstance(section, Mapping):
        raise RecipeError(f"recipe error at diffusion: must be a section of keys, got {type(section).__name__}")
    data = dict(section)
    name = data.setdefault("process", ProcessOptions.model_fields["process"].default)
    try:
        options_cls = getattr(processes.get(str(name)), "Options", ProcessOptions)
    except PluginLoadError as exc:  # a broken plugin module: not a recipe key's fault (its error kept as the cause)
        raise RecipeError(first_line(exc)) from exc
    except PluginError as exc:
        raise RecipeError(f"recipe error at diffusion.process: {first_line(exc)}") from None
    declared = options_cls.model_fields
    for key in list(data):
        if key in declared:
            continue
        if key in EARLIER_DIFFUSION_DEFAULTS and any(data[key] == v and type(data[key]) is type(v)
                                                     for v in EARLIER_DIFFUSION_DEFAULTS[key]):
            del data[key]
            continue
        valid = [k for k in declared if k != "process"]
        hint = did_you_mean(key, valid)
        raise RecipeError(f"recipe error at diffusion.{_shown(str(key))}: the {name} process takes no option "
                          f"'{_shown(str(key))}'{hint} (its options: {', '.join(valid) or 'none'}); remove it")
    try:
        return options_cls.model_validate(data)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"] and message.startswith("at "):  # a combination the options class checks
            raise RecipeError(f"recipe error {message}") from None
        raise RecipeError(format_validation_error({**err, "loc": ("diffusion", *err["loc"])})) from None


class TrainSection(_Section):
    """Optimisation and bookkeeping.

    Attributes:
        batch_size: global batch size per optimizer step (split over processes, then into
            ``grad_accum_steps`` micro-batches).
        grad_accum_steps: micro-batches per optimizer step: each process runs
            ``batch_size / (processes * grad_accum_steps)`` images through the model at a time and
            sums their gradients; under DDP or FSDP they are synchronised once, after the last one.
        strategy: how several processes share the work: ``ddp`` (each holds the whole model,
            gradients are all-reduced) or ``fsdp`` (FSDP2: weights, gradients and AdamW states
            are sharded over the processes, each block gathered only while it runs). One
            process trains the same way under either.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: linear learning-rate warmup.
        lr_schedule: after the warmup, ``constant`` (DiT, DiffiT), or ``cosine`` / ``linear`` decay
            to ``min_lr_ratio * lr`` at ``max_steps`` (short runs end on a lower rate).
        min_lr_ratio: the decayed rate's floor as a fraction of ``lr``.
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

    batch_size: int = Field(256, gt=0, le=2**24)
    grad_accum_steps: int = Field(1, gt=0, le=2**16)
    strategy: Literal["ddp", "fsdp"] = "ddp"
    lr: float = Field(1e-4, gt=0, le=1e3)
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0, le=10**9)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float = Field(0.9999, ge=0, le=1)
    ema_warmup: bool = False
    max_steps: int = Field(400_000, gt=0, le=10**9)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = True
    compile: bool = False
    seed: int = Field(0, ge=0, lt=2**32)
    num_workers: int = Field(0, ge=0, le=1024)
    log_every: int = Field(50, gt=0)
    sample_every: int = Field(0, ge=0)
    ckpt_every: int = Field(0, ge=0)
    keep_last: int = Field(3, gt=0, le=10**6)
    max_bad_steps: int = Field(10, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each AdamW beta must be in [0, 1), got {list(value)}")
        return value


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
    steps: int = Field(250, gt=0, le=100_000)
    eta: float = Field(0.0, ge=0, le=1e3)
    guidance_scale: float = Field(1.0, ge=0, le=1e4)
    guidance_schedule: Literal["constant", "power_cosine"] = "constant"
    guidance_power: float = Field(4.0, ge=-1e3, le=1e3)
    guided_channels: int | None = Field(None, gt=0, le=4096)
    guidance_interval: tuple[float, float] | None = None
    num_images: int = Field(64, gt=0, le=10**7)
    clip_denoised: bool = False
    seed: int = Field(0, ge=0, lt=2**63)


class WandbSection(_Section):
    """Weights & Biases logging (the ``[wandb]`` extra).

    Attributes:
        project: W&B project.
        mode: ``offline`` (written under the run folder, upload later with ``wandb sync``),
            ``online`` or ``disabled``.
        entity: W&B team or user (``null``: your default).
        name: run name shown in W&B (``null``: the recipe's name).
        tags: run tags.
    """

    project: str
    mode: Literal["offline", "online", "disabled"] = "offline"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)


class LoggingSection(_Section):
    """Where a run's metrics and sample grids go besides ``metrics.jsonl`` (rank 0 only).

    Attributes:
        tensorboard: TensorBoard events under ``<run>/tensorboard`` (scalars, learning rate, sample
            grids); ``null``: when the package is installed, ``true``: required, ``false``: off.
        wandb: [`WandbSection`][diffit_toolkit.recipe.WandbSection], or ``null`` (off).
    """

    tensorboard: bool | None = None
    wandb: WandbSection | None = None


class Recipe(_Section):
    """A resolved, validated recipe.

    Attributes:
        name: run name (the run folder defaults to ``runs/<name>``).
        description: free text.
        output_dir: run folder.
        model: ``backbone`` (registered name), ``preset``, and any option of that backbone
            (``mechanism``, ``mechanism_options``, ``window``, ...); validated by building the model
            on the meta device.
        diffusion: the process and its own options
            ([`ProcessOptions`][diffit_toolkit.recipe.ProcessOptions] or the process's subclass).
        data: options of the dataset (``kind``, ``path``, ...), validated against the data config.
        train: [`TrainSection`][diffit_toolkit.recipe.TrainSection].
        sample: [`SampleSection`][diffit_toolkit.recipe.SampleSection].
        logging: [`LoggingSection`][diffit_toolkit.recipe.LoggingSection].
    """

    name: str = "run"
    description: str = ""
    output_dir: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    diffusion: SerializeAsAny[ProcessOptions] = Field(default_factory=lambda: process_options({}))
    data: dict[str, Any] = Field(default_factory=dict)
    train: TrainSection = Field(default_factory=TrainSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @field_validator("diffusion", mode="before")
    @classmethod
    def _the_process_options(cls, value: Any) -> ProcessOptions:
        return process_options(value)

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, name: str) -> str:
        """The name is the run folder's (``runs/<name>``) unless ``output_dir`` is set: never a path."""
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError("must be one plain folder name (the run folder is runs/<name>): no '/', '\\', '..' or "
                             "empty name; set output_dir for another place")
        return name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-ready dict of the whole recipe."""
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- loading -----------------------------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases (``*name``: a few lines of them expand into billions of
    values) and without duplicate keys (the later one would silently win)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in recipes; write the value out",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{_shown(key)}'", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _shown(value: Any, limit: int = 40) -> str:
    """A value for an error message, cut short (messages never carry long file contents)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_yaml(text: str) -> Any:
    """Parse recipe YAML (safe tags only, no aliases, no duplicate keys)."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - _RecipeLoader is a SafeLoader


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist: check the path (shipped recipes are in {RECIPES_DIR})")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"recipe {path} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe names a preset and "
                          f"overrides, not data")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text; give a YAML file") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise RecipeError(f"recipe {path}:{where}: YAML syntax error ({_shown(problem, 80)}); fix the YAML") from None
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


def load_raw(path: str | Path, _seen: tuple[Path, ...] = (), _read: list[Path] | None = None) -> dict[str, Any]:
    """The recipe at ``path`` as a dict, with its ``extends:`` chain merged in (not validated).

    A chain deeper than `MAX_EXTENDS_DEPTH` or reading more than `MAX_EXTENDS_FILES` files in all
    (a fan-out of ``extends: [a.yaml, a.yaml]`` doubles the reads at every level) is refused."""
    path = resolve_recipe_path(path)
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError(f"recipe extends itself in a cycle: {chain}; remove one 'extends'")
    read = [] if _read is None else _read
    read.append(path)
    if len(_seen) >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"recipe {_seen[0]}: its 'extends' chain is more than {MAX_EXTENDS_DEPTH} files deep; "
                          f"merge some of them")
    if len(read) > MAX_EXTENDS_FILES:
        raise RecipeError(f"recipe {read[0]}: its 'extends' read more than {MAX_EXTENDS_FILES} recipe files; "
                          f"extend each file once and merge some of them")
    data = _read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"recipe {path}: 'extends' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_data = load_raw(path.parent / parent, (*_seen, path), read)
        if parent_data and not set(parent_data) & set(Recipe.model_fields):
            # say so without echoing the file: it may be anything (a key file, a config of another tool)
            raise RecipeError(f"recipe {path}: 'extends' names {_shown(parent, 80)}, which is not a recipe "
                              f"(none of its top-level keys is a recipe section)")
        merged = deep_merge(merged, parent_data)
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
        if len(raw) > MAX_OVERRIDE_CHARS:
            raise RecipeError(f"override '{_shown(item)}' is longer than {MAX_OVERRIDE_CHARS} characters")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
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
    if isinstance(value, float) and not math.isfinite(value):
        shown = str(value)
    elif isinstance(value, (str, int, float, bool, type(None))):
        shown = _shown(json.dumps(value))
    else:
        shown = type(value).__name__
    message = error["msg"].removeprefix("Value error, ")
    return f"recipe error at {path}: {message[0].lower() + message[1:]} (got {shown})"


def _check_options(value: Any, path: str, limit: float | None = None, depth: int = 0, where: str = "recipe error at") -> None:
    """Numbers of a free-form section (model, data) are finite and bounded, lists and nesting short."""
    if depth > 8:
        raise RecipeError(f"{where} {path}: nested too deeply")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where} {path}: {value} is not a finite number")
    if isinstance(value, (int, float)):
        bound = limit if limit is not None else MAX_OPTION_NUMBER
        if abs(value) > bound:
            raise RecipeError(f"{where} {path}: {_shown(value)} is beyond the limit of {bound:g}; check the value")
        return
    if isinstance(value, Mapping):
        if len(value) > MAX_OPTION_ITEMS:
            raise RecipeError(f"{where} {path}: more than {MAX_OPTION_ITEMS} keys")
        for key, item in value.items():
            _check_options(item, f"{path}.{_shown(key)}", MODEL_LIMITS.get(str(key)), depth + 1, where)
        return
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_OPTION_ITEMS:
            raise RecipeError(f"{where} {path}: more than {MAX_OPTION_ITEMS} items")
        for i, item in enumerate(value):
            _check_options(item, f"{path}.{i}", limit, depth + 1, where)
        total = sum(v for v in value if isinstance(v, int) and not isinstance(v, bool))
        if limit is not None and path.endswith("num_blocks") and total > limit:
            raise RecipeError(f"{where} {path}: {total} blocks in all is beyond the limit of {limit:g}")


def check_model_options(options: Mapping[str, Any], source: str) -> None:
    """The bounds of a recipe's ``model`` section (`MODEL_LIMITS`) for model options read from
    anywhere else (a model file's header, a ``config.json``, ``--set``), before anything is built;
    a value beyond them is a [`RecipeError`][diffit_toolkit.recipe.RecipeError] naming ``source``."""
    _check_options(dict(options), "model", where=f"{source}:")


def parse_recipe(data: Mapping[str, Any]) -> Recipe:
    """Type-check a raw recipe dict into a [`Recipe`][diffit_toolkit.recipe.Recipe] (types, unknown
    keys, value ranges).

    What only the built parts can check (model shapes, process and sampler, data) is
    [`diffit_toolkit.build.check_recipe`][diffit_toolkit.build.check_recipe];
    ``diffit_toolkit.build.load_recipe`` does both.
    """
    data = dict(data)
    if "diffusion" in data:  # checked first, so that its errors name the process's own keys
        data["diffusion"] = process_options(data["diffusion"])
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise RecipeError(format_validation_error(exc.errors()[0])) from None
    _check_options(recipe.model, "model")
    _check_options(recipe.data, "data")
    return recipe


def read_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, compose (``extends``), override (``--set``) and type-check a recipe file."""
    try:
        return parse_recipe(apply_overrides(load_raw(path), overrides))
    except RecursionError:  # YAML or --set values nested thousands of levels deep
        raise RecipeError(f"recipe {path}: values are nested too deeply to read; flatten them") from None
