"""What a run remembers besides its weights, declared once.

Each entry of a checkpoint's ``state.pt`` is a component with the ``state_dict()`` /
``load_state_dict()`` shape of ``torch.distributed.checkpoint.stateful.Stateful``: the optimizer
(full, unsharded moments), the learning-rate schedule, the gradient scaler, the EMA's update count,
the data sampler's position and the random states. [`TrainState`][diffit_toolkit.train.state.TrainState]
maps the keys of ``state.pt`` to them; the trainer saves and restores the whole table in one call,
and the checkpoint checks read the required keys from it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from diffit_toolkit.train.distributed import DistEnv, full_optimizer_state, load_optimizer_state


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class OptimizerState:
    """The optimizer's full state: gathered on rank 0 under FSDP, loaded into any sharding."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return full_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.model, self.optimizer, state)


class EmaCount:
    """How many updates the EMA has averaged (its warm-up depends on it)."""

    def __init__(self, ema: AveragedModel) -> None:
        self.ema = ema

    def state_dict(self) -> int:
        return int(self.ema.n_averaged.item())

    def load_state_dict(self, state: int) -> None:
        self.ema.n_averaged.fill_(int(state))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class RandomState:
    """This process's random state: torch's, Python's, the loss's generator (and CUDA's)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        self.generator.set_state(state["generator"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class RankRandomStates:
    """Every rank's random state when there are several (each draws its own noise and label
    dropout); ``None`` in one process. Loaded only when written by as many processes: another
    process count continues from rank 0's state (``rng``), equal to the run only to rounding."""

    def __init__(self, own: RandomState, env: DistEnv) -> None:
        self.own, self.env = own, env

    def state_dict(self) -> list[dict[str, Any]] | None:
        if not self.env.distributed:
            return None
        ranks: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(ranks, self.own.state_dict())  # a collective: every rank calls it
        return ranks

    def load_state_dict(self, state: list[dict[str, Any]] | None) -> None:
        if isinstance(state, list) and len(state) == self.env.world_size:
            self.own.load_state_dict(state[self.env.rank])


class TrainState:
    """The layout of ``state.pt``: ``step`` plus one key per component, in load order.

    Args:
        components: key -> component; a component whose ``state_dict()`` is ``None`` is left out
            of the file, and the keys in ``optional`` may be absent when loading.
        optional: keys a checkpoint may lack (written only by some setups).
    """

    def __init__(self, components: Mapping[str, Stateful], optional: tuple[str, ...] = ()) -> None:
        self.components = dict(components)
        self.optional = optional
        self.step = 0

    @property
    def required_keys(self) -> tuple[str, ...]:
        """The keys every checkpoint of this layout holds."""
        return ("step", *(k for k in self.components if k not in self.optional))

    def state_dict(self) -> dict[str, Any]:
        """The whole state (collectives under DDP/FSDP: every rank calls it; rank 0 writes it)."""
        state = {"step": self.step}
        for key, component in self.components.items():
            value = component.state_dict()
            if value is not None:
                state[key] = value
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, component in self.components.items():
            if key in state or key not in self.optional:
                component.load_state_dict(state[key])
        self.step = int(state["step"])
