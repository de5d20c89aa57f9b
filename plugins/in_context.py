"""In-context conditioning: the time and class embeddings join the token sequence."""

from __future__ import annotations

from torch import nn

from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.nn.block import BlockSpec, Conditioning, ConditioningMechanism, Injection


class InContext(ConditioningMechanism):
    """In-context conditioning (DiT, Peebles & Xie 2023, Sec. 3.2): the embeddings of t and y are
    appended to the image tokens as two more tokens (one without labels), treated no differently
    from the image tokens (normalised, attending and attended, through the MLP, with residuals),
    and removed after the last block. DiT: 119.4 Gflops at XL/2, the weakest of its four designs.

    Appended once and carried: the first block appends them, the next blocks find them in the
    sequence, and the backbone drops them before its final layer (the image backbone, whose
    ResBlocks convolve the grid between blocks, drops them after each block). Where the
    conditioning width differs from the block width, ``proj`` (Linear(cond_dim, D), xavier, zero
    bias) maps them; at equal widths (DiT) they enter as they are and the mechanism has no
    parameters. No position bias for them in any window.
    """

    takes_parts = True

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.proj = nn.Identity()
        if spec.cond_dim != spec.dim:
            self.proj = nn.Linear(spec.cond_dim, spec.dim)
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, cond: Conditioning) -> Injection:
        return Injection(sequence=self.proj(cond.tokens))  # (B, 2, D)


@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "in_context", InContext)
