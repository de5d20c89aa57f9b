"""What every denoiser backbone shares: the conditioning (``t_emb``, ``y_emb`` and their sum
``c``), computed once per forward (DiT's habit), the module a mechanism may share across blocks,
the checks of its options, the choice of the output layer, and gradient checkpointing of the blocks.

The embedders stay attributes of the backbone itself, so the released checkpoint keys
(``t_embedder.mlp.{0,2}.*``, ``y_embedder.embedding_table.weight``) are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffit_toolkit.backbones.layers import LabelEmbedder
from diffit_toolkit.nn.block import BlockSpec, Conditioning
from diffit_toolkit.nn.embeddings import TimestepEmbedder
from diffit_toolkit.registry import conditioning

#: Label dropout probability of DiT and the released DiffiT (classifier-free guidance training).
DEFAULT_CLASS_DROPOUT = 0.1

#: Output layer of a backbone whose config and mechanism name none (released DiffiT's).
DEFAULT_FINAL_LAYER = "plain"


def check_conditioning_options(num_classes: int, class_dropout_prob: float) -> None:
    """One-line errors for a bad label count or label dropout."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")


def preferred_final_layer(mechanism: str, final_layer: str | None) -> str:
    """The output layer: ``final_layer`` when given, else the one the mechanism class declares
    (its ``final_layer`` attribute, e.g. ``"adaln"`` for adaLN-Zero), else ``"plain"``."""
    if final_layer is not None:
        return final_layer
    return getattr(conditioning.get(mechanism), "final_layer", None) or DEFAULT_FINAL_LAYER


class ConditionedBackbone(nn.Module):
    """Base class of the backbones: owns ``t_embedder`` and ``y_embedder`` and computes ``c``.

    Subclasses call [`build_conditioning`][diffit_toolkit.backbones.conditioning.ConditionedBackbone.build_conditioning] in ``__init__`` (where the embedders belong in
    their module order) and
    [`init_conditioning`][diffit_toolkit.backbones.conditioning.ConditionedBackbone.init_conditioning] in their weight init, and run their blocks
    through [`run_block`][diffit_toolkit.backbones.conditioning.ConditionedBackbone.run_block].

    Attributes:
        num_classes: class labels (0: unconditional, no label table).
        null_class: label index of the null class (``num_classes``), ``None`` if unconditional.
        grad_checkpointing: recompute each block in the backward pass.
    """

    def build_conditioning(
        self,
        width: int,
        *,
        num_classes: int,
        class_dropout_prob: float,
        time_features: str,
        frequency_dim: int,
        time_feature_options: dict[str, Any],
    ) -> None:
        """Create the time embedder (features -> MLP, width ``width``) and, for class-conditional
        models, the label table of ``num_classes + 1`` rows (the last is the null class)."""
        self.num_classes = num_classes
        self.null_class = num_classes if num_classes > 0 else None
        self.t_embedder = TimestepEmbedder(
            width, features=time_features, frequency_dim=frequency_dim, **time_feature_options
        )
        self.y_embedder = LabelEmbedder(num_classes, width, class_dropout_prob) if num_classes > 0 else None

    def init_conditioning(self) -> None:
        """Label table normal(0.02), as released. The time MLP's normal(0.02) init is its own."""
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def condition(self, t: Tensor, y: Tensor | None = None, force_drop: Tensor | None = None) -> Tensor:
        """The conditioning token ``c = t_emb + y_emb`` (B, width); arguments as
        [`conditioning`][diffit_toolkit.backbones.conditioning.ConditionedBackbone.conditioning]."""
        return self.conditioning(t, y, force_drop).c

    def conditioning(self, t: Tensor, y: Tensor | None = None, force_drop: Tensor | None = None) -> Conditioning:
        """The time and class embeddings (B, width) each, computed once per forward.

        Args:
            t: (B,) timesteps or noise levels.
            y: (B,) labels; ``None`` gives the null class (class-conditional models).
            force_drop: (B,) bool, replace these labels by the null class (guidance batches).
        """
        t_emb = self.t_embedder(t)  # (B, width)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this model is unconditional (num_classes=0): call it with y=None")
            return Conditioning(t_emb)
        if y is None:
            y = torch.full((t.shape[0],), self.null_class, dtype=torch.long, device=t.device)
        return Conditioning(t_emb, self.y_embedder(y, self.training, force_drop))

    @staticmethod
    def build_shared(spec: BlockSpec, mechanism: str, options: dict[str, Any]) -> nn.Module | None:
        """The module the mechanism shares across the blocks built with ``spec`` (its
        ``shared_module``), or ``None`` when it declares none."""
        cls = conditioning.get(mechanism)
        options = dict(options)
        return cls.shared_module(cls.configure_block(spec, **options), **options)

    @staticmethod
    def share(module: nn.Module | None, cond: Conditioning) -> Conditioning:
        """``cond`` with ``shared`` set to ``module(c)`` (unchanged without a shared module)."""
        return cond if module is None else cond._replace(shared=module(cond.c))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""
        self.grad_checkpointing = enable

    def shard_units(self) -> list[nn.Module]:
        """The blocks, each sharded on its own by FSDP (``train.strategy: fsdp``); a subclass lists
        the modules it runs through [`run_block`][diffit_toolkit.backbones.conditioning.ConditionedBackbone.run_block]. Empty: the model is sharded as one unit."""
        return []

    def run_block(self, block: nn.Module, x: Tensor, c: Tensor | Conditioning) -> Tensor:
        """``block(x, c)``, checkpointed when gradient checkpointing is on and gradients are recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)
