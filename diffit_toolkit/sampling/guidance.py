"""Classifier-free guidance (Ho & Salimans, 2022) as used by DiT and DiffiT.

The wrapped model is called once on the batch ``[cond, uncond]`` (the second half labelled with
the model's null class). For the first ``k`` output channels (DiT and DiffiT: 3 of the 4 latent
epsilon channels) the guided output is ``uncond + s_t (cond - uncond)``; the remaining channels
(the rest of epsilon and the learned-variance values) are taken from the conditional half.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from diffit_toolkit.diffusion.gaussian import Model
from diffit_toolkit.diffusion.schedules import NUM_TRAIN_TIMESTEPS

DEFAULT_GUIDED_CHANNELS = 3
"""DiT and DiffiT guide the first 3 of the 4 latent channels."""

DEFAULT_POWER = 4.0
"""Exponent ``p`` of DiffiT's power-cosine schedule at 256 px."""

GuidanceScheduleName = Literal["constant", "power_cosine"]
GUIDANCE_SCHEDULES: tuple[str, ...] = get_args(GuidanceScheduleName)


def power_cosine_scale(
    scale: float, t: torch.Tensor, power: float = DEFAULT_POWER, num_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """DiffiT's schedule ``s_t = (s - 1) * 0.5 * (1 - cos(pi * (1 - t / T)^p)) + 1``.

    Equals 1 at ``t = T`` (pure noise) and ``s`` at ``t = 0``.

    Args:
        scale: The final guidance scale ``s``.
        t: Original timesteps (0..T-1), any shape.
        power: ``p``.
        num_timesteps: ``T``.
    """
    frac = (1 - t.to(torch.float64) / num_timesteps).clamp(min=0) ** power
    return (scale - 1) * 0.5 * (1 - torch.cos(math.pi * frac)) + 1


@dataclass(frozen=True)
class GuidanceConfig:
    """How strongly and where to guide.

    Attributes:
        scale: Guidance scale ``s`` (1 = conditional model, 0 = unconditional; any real is legal).
        schedule: ``"constant"`` (DiT; DiffiT at 512 px) or ``"power_cosine"`` (DiffiT at 256 px).
        power: ``p`` of the power-cosine schedule.
        num_timesteps: ``T`` of the power-cosine schedule (original steps).
        interval: ``(lo, hi)``: guide only inside it (scale 1 outside): in the units of the ``t``
            the model receives, or in noise levels when ``noise_level`` is given; ``None``
            guides everywhere.
        guided_channels: Guide the first ``k`` output channels; ``None`` guides all of them.
        noise_level: Map from the model's ``t`` to the noise level in [0, 1] (1: pure noise), for
            processes whose ``t`` is not a Gaussian step index (EDM's ``c_noise``, the flow
            time). When given, the power-cosine schedule is ``1 + (s - 1) * 0.5 * (1 - cos(pi *
            (1 - level)^p))`` and ``interval`` is in levels; ``None`` means ``level = t / T``.
    """

    scale: float = 1.0
    schedule: GuidanceScheduleName = "constant"
    power: float = DEFAULT_POWER
    num_timesteps: int = NUM_TRAIN_TIMESTEPS
    interval: tuple[float, float] | None = None
    guided_channels: int | None = DEFAULT_GUIDED_CHANNELS
    noise_level: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(
                f"unknown guidance schedule {self.schedule!r}; valid values are {', '.join(GUIDANCE_SCHEDULES)}."
            )
        if self.guided_channels is not None and self.guided_channels < 1:
            raise ValueError(
                f"guided_channels must be >= 1 or None (all channels), got {self.guided_channels}."
            )
        if self.interval is not None and self.interval[0] > self.interval[1]:
            raise ValueError(f"guidance interval must be (t_lo, t_hi) with t_lo <= t_hi, got {self.interval}.")
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}.")

    def scale_at(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample guidance scale ``(B,)`` at timesteps ``t`` ``(B,)`` (float64)."""
        t64 = t.to(torch.float64)
        if self.noise_level is None:  # t is a Gaussian step index 0..T-1
            position, level_steps = t64, self.num_timesteps
        else:
            position, level_steps = self.noise_level(t).to(torch.float64), 1
        if self.schedule == "power_cosine":
            s = power_cosine_scale(self.scale, position, self.power, level_steps)
        else:
            s = torch.full_like(t64, float(self.scale))
        if self.interval is not None:
            inside = (position >= self.interval[0]) & (position <= self.interval[1])
            s = torch.where(inside, s, torch.ones_like(s))
        return s


class ClassifierFreeGuidance:
    """Wrap a conditional model ``(x, t, y) -> out`` into a guided one with the same signature.

    Args:
        model: The conditional network; ``y`` of the null class means "no label".
        config: Scale, schedule, interval and guided channels.
        null_class: The label of the unconditional half; read from ``model.null_class`` if ``None``.
    """

    def __init__(self, model: Model, config: GuidanceConfig, null_class: int | None = None) -> None:
        if null_class is None:
            null_class = getattr(model, "null_class", None)
            if null_class is None:
                raise ValueError(
                    "classifier-free guidance needs the null class: pass null_class=... or give the "
                    "model a null_class attribute."
                )
        self.model = model
        self.config = config
        self.null_class = int(null_class)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Guided output ``(B, C_out, ...)`` from one forward pass on ``2B`` inputs."""
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y; got None.")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        x_in = torch.cat([x, x], dim=0)  # (2B, C, ...): [cond, uncond]
        t_in = torch.cat([t, t], dim=0)
        y_in = torch.cat([y, torch.full_like(y, self.null_class)], dim=0)
        out = self.model(x_in, t_in, y_in)
        cond, uncond = out[:b], out[b:]
        k = cond.shape[1] if self.config.guided_channels is None else self.config.guided_channels
        if k > cond.shape[1]:
            raise ValueError(
                f"guided_channels={k} exceeds the model's {cond.shape[1]} output channels; "
                "lower it or pass None to guide all channels."
            )
        s = self.config.scale_at(t).to(device=out.device, dtype=out.dtype)
        s = s.reshape(-1, *([1] * (out.ndim - 1)))  # (B, 1, ...)
        # lerp is exact at s = 1 (returns cond) and s = 0 (returns uncond).
        guided = torch.lerp(uncond[:, :k], cond[:, :k], s.expand_as(cond[:, :k]))
        return torch.cat([guided, cond[:, k:]], dim=1)
