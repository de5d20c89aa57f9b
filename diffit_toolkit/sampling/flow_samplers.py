"""Euler and Heun ODE samplers for flow matching ([`LinearFlow`][diffit_toolkit.diffusion.flow.LinearFlow]).

They integrate ``dx/dt = v(x, t, y)`` on a uniform grid from ``t = 0`` (noise) to ``t = 1`` (data).
"""

from __future__ import annotations

import torch

from diffit_toolkit.diffusion.flow import VelocityModel


def _grid(num_steps: int, x: torch.Tensor) -> torch.Tensor:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=x.dtype, device=x.device)


def _t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.expand(x.shape[0])  # (B,)


@torch.no_grad()
def flow_euler_sample(
    model: VelocityModel, noise: torch.Tensor, y: torch.Tensor | None = None, num_steps: int = 50
) -> torch.Tensor:
    """Explicit Euler: ``x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)``; ``num_steps`` evaluations.

    Args:
        model: Velocity model ``v(x, t, y)``.
        noise: ``(B, C, ...)`` standard normal ``x_0``.
        y: Labels.
        num_steps: Number of uniform steps.

    Returns:
        ``(B, C, ...)`` samples at ``t = 1``.
    """
    ts = _grid(num_steps, noise)
    x = noise
    for k in range(num_steps):
        x = x + (ts[k + 1] - ts[k]) * model(x, _t(ts[k], x), y)
    return x


@torch.no_grad()
def flow_heun_sample(
    model: VelocityModel, noise: torch.Tensor, y: torch.Tensor | None = None, num_steps: int = 25
) -> torch.Tensor:
    """Heun (explicit trapezoid): Euler predictor, average-slope corrector; ``2 num_steps`` evaluations.

    Args:
        model: Velocity model ``v(x, t, y)``.
        noise: ``(B, C, ...)`` standard normal ``x_0``.
        y: Labels.
        num_steps: Number of uniform steps.

    Returns:
        ``(B, C, ...)`` samples at ``t = 1``.
    """
    ts = _grid(num_steps, noise)
    x = noise
    for k in range(num_steps):
        dt = ts[k + 1] - ts[k]
        d_cur = model(x, _t(ts[k], x), y)
        x_pred = x + dt * d_cur
        d_next = model(x_pred, _t(ts[k + 1], x), y)
        x = x + dt * 0.5 * (d_cur + d_next)
    return x
