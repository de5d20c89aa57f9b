"""Beta schedules and timestep respacing for the discrete Gaussian (ADM / DiT) diffusion.

The schedules follow ADM's ``get_named_beta_schedule`` (Nichol & Dhariwal, 2021) exactly, so a
DiT checkpoint trained with ``"linear"`` sees the same ``alphas_cumprod`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
"""Number of diffusion steps DiT and ADM train with."""

LINEAR_BETA_START = 1e-4
"""First beta of the linear schedule at 1000 steps (Ho et al., 2020)."""

LINEAR_BETA_END = 0.02
"""Last beta of the linear schedule at 1000 steps (Ho et al., 2020)."""

COSINE_OFFSET = 0.008
"""The ``s`` offset of the cosine schedule (Nichol & Dhariwal, 2021, eq. 17)."""

MAX_BETA = 0.999
"""Betas of the cosine schedule are clipped to this value (Nichol & Dhariwal, 2021, sec. 3.2)."""

BETA_SCHEDULES = ("linear", "cosine")
"""Names accepted by [`get_named_beta_schedule`][diffit_toolkit.diffusion.schedules.get_named_beta_schedule]."""


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = MAX_BETA,
) -> torch.Tensor:
    """Discretise a continuous ``alpha_bar(t)`` (t in [0, 1]) into betas.

    Args:
        num_diffusion_timesteps: Number of betas to produce.
        alpha_bar: Cumulative product of ``1 - beta`` as a function of ``t`` in [0, 1].
        max_beta: Upper clip of each beta, avoiding singularities near ``t = 1``.

    Returns:
        float64 tensor of shape ``(num_diffusion_timesteps,)``.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float64)


def get_named_beta_schedule(
    schedule_name: str, num_diffusion_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """Return the betas of a named schedule, as ADM's ``get_named_beta_schedule``.

    Args:
        schedule_name: ``"linear"`` (Ho et al., 2020, rescaled so any step count matches the
            1000-step schedule) or ``"cosine"`` (Nichol & Dhariwal, 2021, eq. 17).
        num_diffusion_timesteps: Number of diffusion steps.

    Returns:
        float64 tensor of shape ``(num_diffusion_timesteps,)``.

    Raises:
        ValueError: on an unknown name or a non-positive step count.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(
            f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}; pass e.g. 1000."
        )
    if schedule_name == "linear":
        # ADM: scale so that the schedule with T steps matches the 1000-step one.
        scale = NUM_TRAIN_TIMESTEPS / num_diffusion_timesteps
        return torch.linspace(
            scale * LINEAR_BETA_START,
            scale * LINEAR_BETA_END,
            num_diffusion_timesteps,
            dtype=torch.float64,
        )
    if schedule_name == "cosine":
        # Nichol & Dhariwal (2021), eq. 17.
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown beta schedule {schedule_name!r}; valid names are {', '.join(BETA_SCHEDULES)}."
    )


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Choose which of the original timesteps a respaced process keeps (ADM's ``space_timesteps``).

    The process is split into equal sections, and each section keeps an evenly strided subset of
    its steps. ``"ddimN"`` instead uses DDIM's fixed stride ``T // N`` starting at 0.

    Args:
        num_timesteps: Number of steps of the original process (e.g. 1000).
        section_counts: An int ``N`` or a string ``"N"`` (one section, N steps), a
            comma-separated string / sequence ``"10,15,20"`` (one count per section), or
            ``"ddimN"``.

    Returns:
        Sorted list of kept original timestep indices (always including 0).

    Raises:
        ValueError: if a count exceeds the steps available or is not positive.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            if not 1 <= desired <= num_timesteps:
                raise ValueError(
                    f"cannot respace {num_timesteps} steps to {desired} DDIM steps; "
                    f"choose between 1 and {num_timesteps}."
                )
            for stride in range(1, num_timesteps + 1):
                kept = list(range(0, num_timesteps, stride))
                if len(kept) == desired:
                    return kept
            raise ValueError(
                f"cannot create exactly {desired} DDIM steps with an integer stride from "
                f"{num_timesteps}; use a plain count like '{desired}' instead."
            )
        counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts!r}.")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    kept: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"cannot respace a section of {size} steps to {section_count} steps "
                f"(total requested {sum(counts)} of {num_timesteps}); request fewer steps."
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            kept.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(kept))
