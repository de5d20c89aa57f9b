"""diffit-toolkit: DiffiT (time-dependent self-attention) and DiT diffusion transformers with
swappable conditioning mechanisms.

The public entry points for plugin authors are the ``register_*`` functions and the block API
(:class:`~diffit_toolkit.nn.block.ConditioningMechanism`, :class:`~diffit_toolkit.nn.block.Injection`,
:class:`~diffit_toolkit.nn.block.BlockSpec`, :class:`~diffit_toolkit.nn.block.DiffiTBlock`).
"""

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

__version__ = "0.1.0"

from diffit_toolkit.nn.attention import Attention, AttentionBackend  # noqa: E402
from diffit_toolkit.nn.block import BlockSpec, ConditioningMechanism, DiffiTBlock, Injection  # noqa: E402
from diffit_toolkit.nn.embeddings import TimestepEmbedder  # noqa: E402

__all__ = [
    "Attention",
    "AttentionBackend",
    "BlockSpec",
    "ConditioningMechanism",
    "DiffiTBlock",
    "DuplicatePluginError",
    "Injection",
    "PluginBuildError",
    "PluginError",
    "TimestepEmbedder",
    "UnknownPluginError",
    "__version__",
    "get_registry",
    "register_attention_backend",
    "register_backbone",
    "register_conditioning",
    "register_time_embedding",
]
