"""Run by torchrun in the FSDP tests: train tiny recipes under ``train.strategy=fsdp``, one after
another in the same processes, and report per rank and run how many gradient reduce-scatters FSDP
ran and how many of the model's elements this rank holds. The process group stays up from one
run to the next (joining it again in the same process would wait forever on torchrun's store).

Argument: a JSON file ``[{"recipe": PATH, "set": [OVERRIDE, ...], "stop_after": N | null,
"resume": CHECKPOINT | null, "report": PATH}, ...]``; ``report`` gets ``.rank{R}.json`` appended.
"""

import json
import os
import sys

from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

import diffit_toolkit.train.trainer as trainer
from diffit_toolkit.build import load_recipe
from diffit_toolkit.train import train
from diffit_toolkit.train.distributed import cleanup_distributed

reduce_scatters = [0]
reduce_scatter = DefaultReduceScatter.__call__


def counting(self, *args, **kwargs):
    reduce_scatters[0] += 1
    return reduce_scatter(self, *args, **kwargs)


DefaultReduceScatter.__call__ = counting
trainer.cleanup_distributed = lambda: None
rank = int(os.environ["RANK"])
for run in json.loads(open(sys.argv[1]).read()):
    reduce_scatters[0] = 0
    recipe = load_recipe(run["recipe"], ["train.strategy=fsdp", *run["set"]])
    result = train(recipe, device="cpu", progress=False, stop_after=run.get("stop_after"), resume=run.get("resume"))
    report = {
        "step": result.step,
        "reduce_scatters": reduce_scatters[0],
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in result.model.modules()),
        "ema_sharded": isinstance(result.ema, FSDPModule),
        "local_numel": sum(p.to_local().numel() for p in result.model.parameters()),
        "full_numel": sum(p.numel() for p in result.model.parameters()),
    }
    with open(f"{run['report']}.rank{rank}.json", "w") as f:
        json.dump(report, f)
cleanup_distributed()
