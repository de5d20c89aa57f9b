"""Run by torchrun in the DDP tests: train a tiny recipe (extra arguments are ``--set``
overrides), report this rank's weights digest and how many gradient all-reduces DDP ran."""

import hashlib
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import diffit_toolkit.train.trainer as trainer
from diffit_toolkit.build import load_recipe
from diffit_toolkit.train import train

recipe_path, out_dir, digest_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
allreduces = [0]


class CountingDDP(DistributedDataParallel):
    """DDP whose gradient all-reduces are counted (a comm hook around the default one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def counting(state, bucket):
            allreduces[0] += 1
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, counting)


trainer.DistributedDataParallel = CountingDDP
result = train(load_recipe(recipe_path, [f"output_dir={out_dir}", *sys.argv[4:]]), device="cpu", progress=False)
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().contiguous().numpy().tobytes())
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ.get("RANK", 0))
(digest_dir / f"rank{rank}.txt").write_text(digest.hexdigest())
(digest_dir / f"allreduces{rank}.txt").write_text(str(allreduces[0]))
