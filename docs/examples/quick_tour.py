"""Build one DiffiT block with every registered conditioning mechanism and run it."""
import torch

from diffit_toolkit import BlockSpec, DiffiTBlock
from diffit_toolkit.registry import conditioning

spec = BlockSpec(dim=96, num_heads=4, cond_dim=96, grid=(8, 8), window=4,
                 rel_pos_bias=True)
x, c = torch.randn(2, 64, 96), torch.randn(2, 96)  # tokens (B, N, D), conditioning (B, D)
for entry in conditioning.entries():
    block = DiffiTBlock(spec, entry.name)
    extra = sum(p.numel() for p in block.cond.parameters())
    out = tuple(block(x, c).shape)
    print(f"{entry.name:15s} from {entry.source:15s} out {out}  +{extra} params")
