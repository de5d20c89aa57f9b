"""adaLN-single: one modulation MLP for all blocks, a learned table per block (PixArt-alpha)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.block import BlockSpec, Conditioning, ConditioningMechanism, Injection


class SharedModulation(nn.Module):
    """``SiLU -> Linear(cond_dim, 6 dim)`` on ``c``, once per forward for every block (PixArt's
    ``t_block``, diffusers' ``AdaLayerNormSingle.linear``): weight normal(0.02), zero bias, as
    PixArt initialises it."""

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> Tensor:
        return self.linear(self.silu(c))  # (B, 6D)


class AdaLNSingle(ConditioningMechanism):
    """adaLN-single (PixArt-alpha, Chen et al. 2023, Sec. 2.3; diffusers ``AdaLayerNormSingle``):
    the backbone's one shared ``SiLU -> Linear(cond_dim, 6 dim)`` computes the six modulation
    vectors for all blocks; each block adds its own learned ``scale_shift_table`` (6, dim),
    initialised ``randn / sqrt(dim)``, before the split (PixArt's ``t2i_modulate``):
    shift, scale, gate for the attention and for the MLP, in DiT's order, ``LN(x) * (1 + scale) +
    shift`` into each branch and the gate on its output. Per block it costs 6 dim parameters
    instead of adaLN-Zero's ``6 dim (cond_dim + 1)``.
    """

    takes_parts = True
    final_layer = "adaln"  # DiT's modulated output layer (PixArt's has a table of its own)

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.scale_shift_table = nn.Parameter(torch.randn(6, spec.dim) / spec.dim**0.5)

    @classmethod
    def shared_module(cls, spec: BlockSpec, **options: Any) -> nn.Module:
        return SharedModulation(spec.cond_dim, spec.dim)

    def forward(self, cond: Conditioning) -> Injection:
        if cond.shared is None:
            raise ValueError("adaln_single reads the modulation its backbone shares across blocks: "
                             "call the block with a Conditioning whose shared field holds it")
        table = self.scale_shift_table[None] + cond.shared.reshape(cond.shared.shape[0], 6, -1)  # (B, 6, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = table.chunk(6, dim=1)  # (B, 1, D) each
        return Injection(shift_attn=shift_a, scale_attn=scale_a, gate_attn=gate_a,
                         shift_mlp=shift_m, scale_mlp=scale_m, gate_mlp=gate_m)


@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "adaln_single", AdaLNSingle)
