"""Relative-bias-only conditioning: the time token makes the relative position bias table time-dependent."""

from __future__ import annotations

from torch import Tensor, nn

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.block import BlockSpec, ConditioningMechanism, Injection


class RelativeBias(ConditioningMechanism):
    """Time token in the relative position bias only (DiffiT Table 6, config F: FID 3.97).

    ``Linear(cond_dim, T * heads)`` maps the token to a per-sample offset of the whole bias table
    (T = ``(2w-1)^2`` rows), which the attention gathers per (query, key) pair. The offset varies
    across key positions by construction: a bias that is constant along the key axis would be
    cancelled by the softmax and do nothing (a common pitfall). Zero-initialised, so a fresh block
    equals plain attention with the static table; the weights still receive gradients. The
    parameter count grows with the table (``cond_dim * T * heads``): fine at ablation scale,
    large for a 16x16 global table at XL width.
    """

    requires_rel_pos_bias = True

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.table_size = spec.bias_table_size
        self.bias_temb = nn.Linear(spec.cond_dim, self.table_size * spec.num_heads)
        nn.init.zeros_(self.bias_temb.weight)
        nn.init.zeros_(self.bias_temb.bias)

    def forward(self, c: Tensor) -> Injection:
        offset = self.bias_temb(c).view(c.shape[0], self.table_size, self.spec.num_heads)  # (B, T, H)
        return Injection(bias_table=offset)


@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "relative_bias", RelativeBias)
