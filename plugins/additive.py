"""Additive conditioning: the projected time token, adaptively scaled, added to the spatial tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.block import BlockSpec, ConditioningMechanism, Injection


class Additive(ConditioningMechanism):
    """Projected, scaled and added to the tokens (DiffiT Table 4, configs A-C: "the projected
    temporal component is adaptively scaled and simply added to the spatial component").

    ``tokens = gamma * Linear(cond_dim, dim)(c)`` is added to the block input, with ``gamma`` a
    learnable per-channel scale (option ``init_scale``, default 1). Attention and MLP stay
    time-independent. Init: xavier-uniform projection, zero bias.
    """

    def __init__(self, spec: BlockSpec, init_scale: float = 1.0) -> None:
        super().__init__(spec)
        self.add_temb = nn.Linear(spec.cond_dim, spec.dim)
        self.gamma = nn.Parameter(torch.full((spec.dim,), float(init_scale)))
        nn.init.xavier_uniform_(self.add_temb.weight)
        nn.init.zeros_(self.add_temb.bias)

    def forward(self, c: Tensor) -> Injection:
        return Injection(tokens=(self.gamma * self.add_temb(c))[:, None])  # (B, 1, D)


@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "additive", Additive)
