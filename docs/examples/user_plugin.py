"""A new conditioning mechanism in user code: TMSA whose branches start closed (zero gates)."""
import torch
from torch import nn

from diffit_toolkit import BlockSpec, ConditioningMechanism, DiffiTBlock, Injection, register_conditioning


@register_conditioning("gated_tmsa")
class GatedTMSA(ConditioningMechanism):
    """TMSA's q/k/v offsets plus adaLN-Zero-style gates on both residual branches."""

    def __init__(self, spec: BlockSpec):
        super().__init__(spec)
        self.qkv_temb = nn.Linear(spec.cond_dim, 3 * spec.dim)  # the q/k/v site, as in TMSA
        self.gates = nn.Linear(spec.cond_dim, 2 * spec.dim)  # zero-init: the block starts as identity
        nn.init.zeros_(self.gates.weight)
        nn.init.zeros_(self.gates.bias)

    def forward(self, c: torch.Tensor) -> Injection:
        gate_attn, gate_mlp = self.gates(c)[:, None].chunk(2, dim=-1)
        return Injection(qkv=self.qkv_temb(c)[:, None], gate_attn=gate_attn, gate_mlp=gate_mlp)


spec = BlockSpec(dim=64, num_heads=4, cond_dim=64, grid=(8, 8), window=4, rel_pos_bias=True)
block = DiffiTBlock(spec, "gated_tmsa")  # by name, like a recipe line `mechanism: gated_tmsa`
x, c = torch.randn(2, 64, 64), torch.randn(2, 64)
assert torch.equal(block(x, c), x)  # zero gates: identity at initialisation
print("gated_tmsa:", tuple(block(x, c).shape), sum(p.numel() for p in block.cond.parameters()), "parameters")
