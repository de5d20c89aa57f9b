"""Run by torchrun in the DDP test: train a tiny recipe, report this rank's weights digest."""

import hashlib
import sys
from pathlib import Path

import torch

from diffit_toolkit.build import load_recipe
from diffit_toolkit.train import train

recipe_path, out_dir, digest_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
result = train(load_recipe(recipe_path, [f"output_dir={out_dir}"]), device="cpu", progress=False)
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().contiguous().numpy().tobytes())
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ.get("RANK", 0))
(digest_dir / f"rank{rank}.txt").write_text(digest.hexdigest())
