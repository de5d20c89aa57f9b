"""Build one DiffiT block with every registered conditioning mechanism and run it."""
import torch

from diffit_toolkit import BlockSpec, Conditioning, DiffiTBlock
from diffit_toolkit.registry import conditioning

spec = BlockSpec(dim=96, num_heads=4, cond_dim=96, grid=(8, 8), window=4,
                 rel_pos_bias=True)
x = torch.randn(2, 64, 96)  # tokens (B, N, D)
t, y = torch.randn(2, 96), torch.randn(2, 96)  # time and class embeddings (B, D)
every_block_has = ("norm1.", "attn.", "norm2.", "mlp.")
for entry in conditioning.entries():
    block = DiffiTBlock(spec, entry.name)
    shared = entry.obj.shared_module(block.spec)  # built once per backbone (adaLN-single)
    cond = Conditioning(t, y, None if shared is None else shared(t + y))
    added = [p for n, p in block.named_parameters() if not n.startswith(every_block_has)]
    added += [] if shared is None else list(shared.parameters())
    out = tuple(block(x, cond).shape)  # in_context: 2 tokens appended
    params = sum(p.numel() for p in added)
    print(f"{entry.name:15s} from {entry.source:15s} out {out}  +{params} params")
