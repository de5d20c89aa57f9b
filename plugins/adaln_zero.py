"""adaLN-Zero: DiT's conditioning through LayerNorm modulation and zero-initialised gates."""

from __future__ import annotations

from torch import Tensor, nn

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.block import BlockSpec, ConditioningMechanism, Injection


class AdaLNZero(ConditioningMechanism):
    """adaLN-Zero (DiT, Peebles & Xie 2023, Sec. 3.2): ``SiLU -> Linear(cond_dim, 6 dim)`` regresses
    shift, scale and gate for the attention and the MLP branch; ``LN(x) * (1 + scale) + shift``
    feeds each branch and the gate multiplies its output. The linear layer is zero-initialised,
    so a fresh block is the identity. Chunk order as DiT: shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp; the module is ``adaLN_modulation`` like DiT's checkpoints.
    DiT-XL/2 FID 2.27 (675 M parameters).
    """

    identity_at_init = True  # zero-initialised gates: a fresh block returns its input
    final_layer = "adaln"  # DiT pairs adaLN-Zero blocks with its modulated output layer

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(spec.cond_dim, 6 * spec.dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, c: Tensor) -> Injection:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        return Injection(
            shift_attn=shift_a,
            scale_attn=scale_a,
            gate_attn=gate_a,
            shift_mlp=shift_m,
            scale_mlp=scale_m,
            gate_mlp=gate_m,
        )


@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "adaln_zero", AdaLNZero)
