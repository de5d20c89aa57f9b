"""Process-group setup for torchrun, SLURM and single-process runs (DDP over NCCL or gloo)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_only

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
