"""Denoiser backbones: the isotropic latent DiffiT / DiT and the U-shaped image-space DiffiT.

Build one by registry name with a preset and options, or rebuild one from its recorded config:

```python
from diffit_toolkit.registry import backbones
model = backbones.build("latent_diffit", "XL/2", input_size=64)   # DiffiT-XL/2 at 512 px
same = build_backbone(model.config)
```
"""

from __future__ import annotations

from typing import Any

from torch import nn

from diffit_toolkit.backbones.image import IMAGE_PRESETS, ImageDiffiT, ImageDiffiTConfig, image_diffit
from diffit_toolkit.backbones.latent import (
    LATENT_MODELS,
    LATENT_PRESETS,
    LatentDiffiT,
    LatentDiffiTConfig,
    dit,
    latent_diffit,
)
from diffit_toolkit.backbones.pretrained import from_pretrained, is_pretrained_dir, save_pretrained


def build_backbone(config: dict[str, Any], source: str = "model config") -> nn.Module:
    """Rebuild a model from its ``model.config`` (the registry name under ``backbone``, every
    other entry a constructor option; no preset is applied). Its sizes are checked against the
    recipe bounds first; ``source`` names where the config was read, for the error."""
    from diffit_toolkit.recipe import check_model_options
    from diffit_toolkit.registry import backbones

    if not isinstance(config, dict):
        raise ValueError(f"{source} holds a {type(config).__name__}, not a model config")
    check_model_options(config, source)  # sizes from a file are bounded before anything is allocated
    options = dict(config)
    name = options.pop("backbone", None)
    if not isinstance(name, str):
        raise ValueError("a backbone config needs the registry name under 'backbone'")
    return build_registered_backbone(name, None, **options)


def build_registered_backbone(name: str, preset: str | None, **options: Any) -> nn.Module:
    """The registered backbone factory ``name`` called with ``preset`` and ``options``; a factory
    that returns something other than a module is a one-line
    [`PluginError`][diffit_toolkit.registry.PluginError] naming it."""
    from diffit_toolkit.registry import PluginError, backbones

    model = backbones.build(name, preset, **options)
    if not isinstance(model, nn.Module):
        raise PluginError(f"backbone '{name}' (from '{backbones.entry(name).source}') returned a "
                          f"{type(model).__name__}, not a torch.nn.Module: its factory must return the model")
    return model


__all__ = [
    "IMAGE_PRESETS",
    "LATENT_MODELS",
    "LATENT_PRESETS",
    "ImageDiffiT",
    "ImageDiffiTConfig",
    "LatentDiffiT",
    "LatentDiffiTConfig",
    "build_backbone",
    "build_registered_backbone",
    "from_pretrained",
    "is_pretrained_dir",
    "save_pretrained",
    "dit",
    "image_diffit",
    "latent_diffit",
]
