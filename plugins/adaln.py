"""adaLN: DiT's adaptive LayerNorm, without adaLN-Zero's gates and zero initialisation."""

from __future__ import annotations

from torch import Tensor, nn

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.block import BlockSpec, ConditioningMechanism, Injection


class AdaLN(ConditioningMechanism):
    """Adaptive layer norm (DiT, Peebles & Xie 2023, Sec. 3.2): ``SiLU -> Linear(cond_dim, 4 dim)``
    regresses a shift and a scale for each of the block's two LayerNorms,
    ``LN(x) * (1 + scale) + shift``; no gates, and the linear layer initialised like every other
    (xavier-uniform, zero bias), not zero. Chunk order: shift_msa, scale_msa, shift_mlp, scale_mlp.
    DiT: 118.6 Gflops at XL/2; in its Fig. 5 below adaLN-Zero.
    """

    final_layer = "adaln"  # DiT's modulated output layer, as with adaLN-Zero

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(spec.cond_dim, 4 * spec.dim))
        nn.init.xavier_uniform_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, c: Tensor) -> Injection:
        shift_a, scale_a, shift_m, scale_m = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)  # (B, 1, D) each
        return Injection(shift_attn=shift_a, scale_attn=scale_a, shift_mlp=shift_m, scale_mlp=scale_m)


@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "adaln", AdaLN)
