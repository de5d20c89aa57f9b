"""``save_pretrained`` / ``from_pretrained``: a model as a folder, the diffusers/timm convention.

A pretrained folder holds ``config.json`` (the backbone's registry name under ``backbone`` and
every constructor option, as [`build_backbone`][diffit_toolkit.backbones.build_backbone] takes them, plus
``_class_name`` and ``_diffit_toolkit_format``) and ``model.safetensors`` (the weights, nothing
pickled). It loads without a run folder:

```python
model.save_pretrained("exported/dit_s2")
same = LatentDiffiT.from_pretrained("exported/dit_s2")     # or backbones.from_pretrained(...)
```

The weights are checked against the rebuilt model before they are copied in: a wrong file is
one ValueError line naming the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

#: File names of a pretrained folder.
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
#: Version of the folder format, written to ``config.json``.
PRETRAINED_FORMAT = "1"
#: How many offending keys an error message names per kind.
KEYS_SHOWN = 4

M = TypeVar("M", bound="PretrainedMixin")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:KEYS_SHOWN])
    more = f", ... {len(items) - KEYS_SHOWN} more" if len(items) > KEYS_SHOWN else ""
    return f"[{shown}{more}]"


def check_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], source: str, optional: tuple[str, ...] = ()
) -> None:
    """Raise one ValueError line naming missing, unexpected and mis-shaped keys (if any).

    Args:
        model: the model the weights are for.
        state: the weights (already in the model's key names).
        source: what the weights are (file name, layout) for the message.
        optional: key suffixes that may be absent (derived buffers like ``relative_position_index``).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(optional)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(expected[k].shape)} in model"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s) {_listing(misshaped)}")
    if problems:
        name = getattr(model, "config", {}).get("backbone", type(model).__name__)
        raise ValueError(f"{source} does not fit the {name} model: " + "; ".join(problems))


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str, optional: tuple[str, ...] = ()) -> nn.Module:
    """Check ``state`` against ``model`` (one-line error) and copy it in."""
    check_state_dict(model, state, source, optional)
    expected = model.state_dict()
    for key in state:
        if key.endswith(optional) and not torch.equal(state[key].to(expected[key].dtype), expected[key].cpu()):
            raise ValueError(f"{source}: derived buffer '{key}' differs from the model's (another window layout?)")
    model.load_state_dict(dict(state), strict=False)
    return model


def is_pretrained_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder with ``config.json`` and ``model.safetensors``."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_pretrained_config(directory: str | Path) -> dict[str, Any]:
    """The backbone config of a pretrained folder (without the ``_``-prefixed bookkeeping keys)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such folder: {directory}")
    if not is_pretrained_dir(directory):
        raise ValueError(f"{directory} is not a pretrained model folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict) or not isinstance(config.get("backbone"), str):
        raise ValueError(f"{directory / CONFIG_NAME} has no 'backbone' entry: not a diffit-toolkit model folder")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def save_pretrained(model: nn.Module, directory: str | Path, state_dict: Mapping[str, Tensor] | None = None) -> Path:
    """Write ``model`` (or ``state_dict`` with ``model``'s config, e.g. EMA weights) to ``directory``."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if not isinstance(config, Mapping) or "backbone" not in config:
        raise ValueError("only models built by a registered backbone (with model.config) can be saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    check_state_dict(model, state, "the weights to save")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    header = {"_class_name": type(model).__name__, "_diffit_toolkit_format": PRETRAINED_FORMAT, **dict(config)}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps(header, indent=2, sort_keys=False) + "\n")
    return directory


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file on the CPU; a damaged one (torn, a header length or
    offsets past its end, overlapping tensors, an empty file) is one ``ValueError`` line naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, or an OSError/ValueError for a torn file
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ValueError(f"cannot read '{path}' as safetensors ({type(exc).__name__}: {first}); the file is "
                         f"damaged or not a safetensors file") from None


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the backbone recorded in ``directory/config.json`` and load ``model.safetensors``."""
    from diffit_toolkit.backbones import build_backbone

    directory = Path(directory)
    model = build_backbone(read_pretrained_config(directory), source=str(directory / CONFIG_NAME))
    load_weights(model, read_safetensors(directory / WEIGHTS_NAME), f"'{directory / WEIGHTS_NAME}'")
    return model.to(map_location).eval()


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``cls.from_pretrained(dir)`` for every backbone."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (created if missing)."""
        return save_pretrained(self, directory)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, map_location: str | torch.device = "cpu") -> M:
        """The model saved in ``directory`` (eval mode); an error if it is not a ``cls``."""
        model = from_pretrained(directory, map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}; "
                             f"use diffit_toolkit.backbones.from_pretrained")
        return model
