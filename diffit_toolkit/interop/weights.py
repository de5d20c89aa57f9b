"""Weights from any path a user can give, whatever its format.

[`weights_format`][diffit_toolkit.interop.weights.weights_format] decides what a path holds;
training (``train --init-from``), sampling and export all read weights through it:

| format | what the path is |
| --- | --- |
| `checkpoint` | a run folder (its newest checkpoint) or a checkpoint step folder: ``ema`` and ``model`` weights and the resolved recipe |
| `pretrained` | an exported or ``save_pretrained`` folder: ``config.json`` + ``model.safetensors`` |
| `diffusers` | a diffusers ``DiTTransformer2DModel`` folder (any weights variant) or pipeline folder |
| `file` | a single weights file: a toolkit model file, or released DiT / DiffiT / diffusers DiT weights (converted on load) |
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffit_toolkit.backbones import from_pretrained, is_pretrained_dir
from diffit_toolkit.backbones.pretrained import WEIGHTS_NAME, read_safetensors
from diffit_toolkit.interop.diffusers_dit import is_diffusers_folder
from diffit_toolkit.interop.released import load_released
from diffit_toolkit.runs import CheckpointError, CheckpointPathError, latest_checkpoint, load_checkpoint
from diffit_toolkit.runs.model_file import load_model_file, read_config

#: A run folder (its newest checkpoint) or a checkpoint step folder.
CHECKPOINT = "checkpoint"
#: An exported or ``save_pretrained`` folder (``config.json`` + ``model.safetensors``).
PRETRAINED = "pretrained"
#: A diffusers model or pipeline folder.
DIFFUSERS = "diffusers"
#: A single weights file: a toolkit model file or released weights.
FILE = "file"
#: The two sets of weights a checkpoint holds.
WEIGHTS_CHOICES = ("ema", "model")


def weights_format(path: Path) -> str:
    """What ``path`` holds: ``"checkpoint"``, ``"pretrained"``, ``"diffusers"`` or ``"file"``
    (see [the formats][diffit_toolkit.interop.weights]).

    Raises:
        CheckpointPathError: one line when ``path`` does not exist.
    """
    if not path.exists():
        raise CheckpointPathError(f"no such {'file' if path.suffix else 'folder'}: {path}")
    if path.is_file():
        return FILE
    if (path / "state.pt").is_file():  # a step folder holds config.json and model.safetensors too
        return CHECKPOINT
    if is_pretrained_dir(path):
        return PRETRAINED
    if is_diffusers_folder(path):
        return DIFFUSERS
    return CHECKPOINT


def check_weights_choice(weights: str) -> None:
    """Refuse a choice of checkpoint weights other than ``ema`` or ``model``."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be 'ema' or 'model', got '{weights}'")


def checkpoint_folder(path: Path) -> Path:
    """The step folder to read: a run folder's newest complete checkpoint, or ``path`` itself."""
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointPathError(f"run folder {path} has no complete checkpoint yet")
        return found
    return path


def load_model(path: Path, fmt: str) -> torch.nn.Module:
    """The model at ``path`` in a format that holds one set of weights (``file``, ``pretrained`` or
    ``diffusers``; a checkpoint is read with its recipe instead)."""
    if fmt == FILE:
        try:
            read_config(path)
        except ValueError:  # no toolkit model file: released DiT / DiffiT / diffusers DiT weights
            return load_released(path)
        return load_model_file(path)
    if fmt == PRETRAINED:
        return from_pretrained(path)
    if fmt == DIFFUSERS:  # a diffusers DiTTransformer2DModel folder
        return load_released(path)
    raise ValueError(f"{path} is a {fmt}, not a single set of weights")


def read_weights(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The weights at ``path`` in the toolkit's key names, for ``train --init-from``: any
    [format][diffit_toolkit.interop.weights] (``weights``, ``ema`` or ``model``, chooses a
    checkpoint's set)."""
    path = Path(path)
    fmt = weights_format(path)
    check_weights_choice(weights)
    if fmt == PRETRAINED:
        return read_safetensors(path / WEIGHTS_NAME)
    if fmt != CHECKPOINT:
        return load_model(path, fmt).state_dict()
    return load_checkpoint(checkpoint_folder(path))[weights]


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse weights holding inf or nan (they sample black or noise images without any error)."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weight tensor(s) hold inf or nan (first: {bad[0]}); they cannot "
                              f"sample: use an earlier checkpoint")
