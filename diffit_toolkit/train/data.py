"""A data order that is a pure function of (seed, epoch, position): exact resume, DDP-aware."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles the dataset once per epoch (seeded by ``seed + epoch``), gives each rank every
    ``world_size``-th index of the usable prefix, and starts an epoch at the batch it was stopped.

    The trainer calls [`advance`][diffit_toolkit.train.data.ResumableSampler.advance] after each
    consumed batch and `next_epoch` when the
    loader runs out; `state_dict` is the data position stored in checkpoints.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.batch = 0
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_items} items cannot fill one batch of {batch_size} x {world_size} processes")

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's indices of ``epoch``, in order."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_items, generator=g)
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        return perm[:usable][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        start = self.batch * self.batch_size
        return iter(self.indices(self.epoch)[start:].tolist())

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def advance(self) -> None:
        """One batch was consumed."""
        self.batch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])
        if self.batch >= self.batches_per_epoch:
            self.next_epoch()
