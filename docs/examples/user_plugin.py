"""A conditioning mechanism in user code: TMSA whose branches start closed."""
import torch
from torch import nn

from diffit_toolkit import BlockSpec, ConditioningMechanism, DiffiTBlock, Injection
from diffit_toolkit import register_conditioning


@register_conditioning("gated_tmsa")
class GatedTMSA(ConditioningMechanism):
    """TMSA's q/k/v offsets plus adaLN-Zero-style gates on both residual branches."""

    def __init__(self, spec: BlockSpec):
        super().__init__(spec)
        self.qkv_temb = nn.Linear(spec.cond_dim, 3 * spec.dim)  # the q/k/v site, as TMSA
        self.gates = nn.Linear(spec.cond_dim, 2 * spec.dim)  # zero: starts as identity
        nn.init.zeros_(self.gates.weight)
        nn.init.zeros_(self.gates.bias)

    def forward(self, c: torch.Tensor) -> Injection:
        gate_attn, gate_mlp = self.gates(c)[:, None].chunk(2, dim=-1)
        qkv = self.qkv_temb(c)[:, None]
        return Injection(qkv=qkv, gate_attn=gate_attn, gate_mlp=gate_mlp)


spec = BlockSpec(dim=64, num_heads=4, cond_dim=64, grid=(8, 8), window=4,
                 rel_pos_bias=True)
block = DiffiTBlock(spec, "gated_tmsa")  # by name, as a recipe names it
x, c = torch.randn(2, 64, 64), torch.randn(2, 64)
assert torch.equal(block(x, c), x)  # zero gates: identity at initialisation
params = sum(p.numel() for p in block.cond.parameters())
print("gated_tmsa:", tuple(block(x, c).shape), params, "parameters")
