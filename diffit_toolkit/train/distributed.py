"""Process-group setup for torchrun, SLURM and single-process runs (NCCL or gloo), and the two
ways several processes share a model: DDP (each holds all of it) or FSDP2 (``fully_shard`` per
block, then the root), with full state dicts that load into either and into one process."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from diffit_toolkit.runs.environment import parse_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank, the world size, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files (output goes through ``@rank_zero_only``)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _from_slurm(environ: dict[str, str]) -> None:
    """Translate SLURM's variables (one task per GPU, ``srun``) into torchrun's, in place."""
    if "WORLD_SIZE" in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    environ.setdefault("MASTER_ADDR", environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))


def setup_distributed(device: str | None = None) -> DistEnv:
    """Join the process group when launched by torchrun or SLURM; otherwise a single process.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``None`` (CUDA when available). Under several
            processes each takes ``cuda:LOCAL_RANK`` and NCCL, or gloo on the CPU; a single
            process keeps the GPU it was given.
    """
    _from_slurm(os.environ)  # type: ignore[arg-type]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    rank_zero_only.rank = rank  # what @rank_zero_only and rank_zero_warn check
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    requested = parse_device(device)
    use_cuda = requested.type == "cuda"
    if use_cuda:
        index = requested.index if world_size == 1 and requested.index is not None else local_rank
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# -- FSDP2 ---------------------------------------------------------------------------------------

#: Gathered, unsharded state dicts on the CPU of rank 0 (the other ranks get ``{}``).
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module) -> int:
    """FSDP2 over every process: ``fully_shard`` each of the backbone's blocks (its
    ``shard_units()``), then the root (embedders, output layer, what is left). Each block's weights
    are gathered only while it runs forward or backward; gradients and optimizer states stay
    sharded. The parameters become DTensors in place: build the optimizer afterwards.

    Each rank keeps its own slice of each tensor, so rank 0's weights and buffers are broadcast
    first (as DDP does when it wraps a model): ranks seeded apart initialise apart.

    Returns the number of blocks sharded on their own (0: the backbone names none, so the whole
    model is one unit).
    """
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor, src=0)
    units = list(model.shard_units()) if callable(getattr(model, "shard_units", None)) else []
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    return len(units)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module | None) -> Iterator[None]:
    """Backward passes that only accumulate gradients locally: DDP's ``no_sync()``, FSDP2's
    ``set_requires_gradient_sync(False)`` (unsharded gradients are kept until the synchronising
    backward), nothing for a single process (``None`` or a plain module)."""
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict: gathered on rank 0's CPU under FSDP (a collective: every rank
    calls it; the others get ``{}``), ``model.state_dict()`` otherwise."""
    return get_model_state_dict(model, options=FULL_ON_RANK0) if is_sharded(model) else model.state_dict()


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (every rank passes the whole of it); under FSDP each rank
    keeps its shard."""
    if is_sharded(model):
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the integer keys of ``optimizer.state_dict()``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as ``optimizer.state_dict()`` of an unsharded model lays it out
    (integer parameter keys), so it loads into a single-process or DDP run. Under FSDP the
    states are gathered to rank 0's CPU (a collective; the other ranks get ``{}``)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an ``optimizer.state_dict()`` of an unsharded model (every rank passes the whole of
    it); under FSDP each rank keeps its shard of each state."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = _optimizer_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
