"""diffit-toolkit: DiffiT (time-dependent self-attention) and DiT diffusion transformers with
swappable conditioning mechanisms.

The public entry points for plugin authors are the ``register_*`` functions and the block API
([`ConditioningMechanism`][diffit_toolkit.nn.block.ConditioningMechanism],
[`Injection`][diffit_toolkit.nn.block.Injection],
[`Conditioning`][diffit_toolkit.nn.block.Conditioning],
[`BlockSpec`][diffit_toolkit.nn.block.BlockSpec], [`DiffiTBlock`][diffit_toolkit.nn.block.DiffiTBlock]).

Importing the package is cheap: each public name is imported from its module on first use
(a module-level ``__getattr__``), so the command line starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_PUBLIC = {
    "DuplicatePluginError": "diffit_toolkit.registry",
    "PluginBuildError": "diffit_toolkit.registry",
    "PluginError": "diffit_toolkit.registry",
    "UnknownPluginError": "diffit_toolkit.registry",
    "get_registry": "diffit_toolkit.registry",
    "register_attention_backend": "diffit_toolkit.registry",
    "register_backbone": "diffit_toolkit.registry",
    "register_conditioning": "diffit_toolkit.registry",
    "register_time_embedding": "diffit_toolkit.registry",
    "Attention": "diffit_toolkit.nn.attention",
    "AttentionBackend": "diffit_toolkit.nn.attention",
    "BlockSpec": "diffit_toolkit.nn.block",
    "Conditioning": "diffit_toolkit.nn.block",
    "ConditioningMechanism": "diffit_toolkit.nn.block",
    "DiffiTBlock": "diffit_toolkit.nn.block",
    "Injection": "diffit_toolkit.nn.block",
    "TimestepEmbedder": "diffit_toolkit.nn.embeddings",
}

__all__ = sorted([*_PUBLIC, "__version__"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily
    from diffit_toolkit.nn.attention import Attention, AttentionBackend
    from diffit_toolkit.nn.block import BlockSpec, Conditioning, ConditioningMechanism, DiffiTBlock, Injection
    from diffit_toolkit.nn.embeddings import TimestepEmbedder
    from diffit_toolkit.registry import (
        DuplicatePluginError,
        PluginBuildError,
        PluginError,
        UnknownPluginError,
        get_registry,
        register_attention_backend,
        register_backbone,
        register_conditioning,
        register_time_embedding,
    )


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'diffit_toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
