"""Flow matching with the linear interpolant and velocity prediction (SiT, Ma et al., 2024).

Convention (SiT's ``ICPlan``): ``t = 0`` is noise and ``t = 1`` is data,

    x_t = t * x_data + (1 - t) * noise,      u = d x_t / dt = x_data - noise,

and the model ``v(x_t, t, y)`` predicts ``u`` for continuous ``t`` in [0, 1] of shape ``(B,)``.
Samplers ([`diffit_toolkit.sampling.flow_euler_sample`][diffit_toolkit.sampling.flow_samplers.flow_euler_sample], ``flow_heun_sample``) integrate
``dx/dt = v`` from ``t = 0`` to ``t = 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffit_toolkit.diffusion.gaussian import mean_flat

VelocityModel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""A velocity model ``v(x_t, t, y)``, ``t`` continuous in [0, 1] of shape ``(B,)``."""


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class LinearFlow:
    """The linear (rectified-flow) interpolant of SiT with velocity prediction."""

    def interpolate(self, x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = t x_data + (1 - t) noise``; ``t`` is ``(B,)``."""
        tt = _per_sample(t, x_data)
        return tt * x_data + (1 - tt) * noise

    def target_velocity(self, x_data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``u = d x_t / dt = x_data - noise``."""
        return x_data - noise

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform training times ``t ~ U(0, 1)``, ``(B,)``."""
        return torch.rand(batch, generator=generator, device=device, dtype=dtype)

    def training_loss(
        self,
        model: VelocityModel,
        x_data: torch.Tensor,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample flow-matching loss ``||v(x_t, t, y) - u||^2`` averaged per dimension, ``(B,)``.

        Args:
            model: The velocity model.
            x_data: ``(B, C, ...)`` data.
            y: Labels.
            generator: Randomness for ``t`` and ``noise`` when they are not given.
            t: ``(B,)`` times; uniform when ``None``.
            noise: Gaussian noise; drawn when ``None``.
        """
        if t is None:
            t = self.sample_t(x_data.shape[0], generator, x_data.device, x_data.dtype)
        if noise is None:
            noise = torch.randn(x_data.shape, generator=generator, device=x_data.device, dtype=x_data.dtype)
        x_t = self.interpolate(x_data, noise, t)
        return mean_flat((model(x_t, t, y) - self.target_velocity(x_data, noise)) ** 2)
