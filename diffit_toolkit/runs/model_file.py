"""Model files: safetensors weights with the resolved model config inside.

A model file is one ``.safetensors`` file. Its header metadata holds the model's ``config`` (the
backbone registry name and every constructor option, as JSON), so loading it rebuilds the model
through the registry and never runs pickled code. Reading state dicts from other files
(``.pt`` with ``weights_only=True`` or ``.safetensors``) and checking them against a model with
one-line errors also lives here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from diffit_toolkit.backbones.pretrained import KEYS_SHOWN, check_state_dict, load_weights, read_safetensors  # noqa: F401  (re-exported)

#: Header metadata keys of a toolkit checkpoint.
CONFIG_KEY = "diffit_toolkit.config"
FORMAT_KEY = "diffit_toolkit.format"
FORMAT_VERSION = "1"

#: Wrapper keys of training checkpoints, in order of preference (EMA weights first, as DiT samples with EMA).
WRAPPER_KEYS = ("ema", "model", "state_dict", "module")



def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat ``name -> tensor`` dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin``.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers
    only, no pickled code. A training checkpoint wrapping the weights under ``ema``, ``model``,
    ``state_dict`` or ``module`` is unwrapped (EMA first). A ``module.`` prefix (DDP) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for files holding pickled objects
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"cannot read '{path}' with torch.load(weights_only=True) ({first}); save the state dict "
                f"alone (torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from exc
    while isinstance(state, Mapping) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"'{path}' holds no tensors at the top level nor under {', '.join(WRAPPER_KEYS)}")
        state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"'{path}' does not hold a state dict (found {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"'{path}': entries that are not tensors: {', '.join(map(str, bad[:KEYS_SHOWN]))}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def save_model_file(model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` as a toolkit checkpoint: safetensors weights + its JSON config in the header.

    Args:
        model: a toolkit model with a ``config`` dict (registry name under ``backbone``).
        path: output file; ``.safetensors`` is appended when missing.
        metadata: extra string entries for the header (e.g. the source file).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping) or "backbone" not in config:
        raise ValueError("only models built by a registered backbone (with model.config) can be saved")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**(metadata or {}), CONFIG_KEY: json.dumps(dict(config), sort_keys=True), FORMAT_KEY: FORMAT_VERSION}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The model config stored in a toolkit checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # SafetensorError for a damaged or foreign file
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ValueError(f"cannot read '{path}' as safetensors ({type(exc).__name__}: {first})") from None
    if CONFIG_KEY not in header:
        raise ValueError(
            f"'{path}' is not a diffit-toolkit checkpoint (no '{CONFIG_KEY}' in its header); "
            f"import released weights with `diffit-toolkit convert`"
        )
    try:
        config = json.loads(header[CONFIG_KEY])
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"'{path}': the model config in its header is not a JSON object; the file is damaged")
    return config


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model recorded in a toolkit checkpoint and load its weights."""
    from diffit_toolkit.backbones import build_backbone

    config = read_config(path)
    model = build_backbone(config, source=f"'{path}'")
    load_weights(model, read_safetensors(path), f"checkpoint '{path}'")
    return model.to(map_location)
