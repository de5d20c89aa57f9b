"""Samplers for the discrete Gaussian family: DDPM ancestral, DDIM and DPM-Solver++(2M).

Each sampler walks the steps of the given
[`GaussianDiffusion`][diffit_toolkit.diffusion.gaussian.GaussianDiffusion]
(respace it first, e.g. ``diffusion.respace(250)``), calls the model with the original timesteps,
and costs one network evaluation per step.
"""

from __future__ import annotations

import math

import torch

from diffit_toolkit.diffusion.gaussian import GaussianDiffusion, Model
from diffit_toolkit.sampling.noise import Generators, randn


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


def _step(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)  # (B,)


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    generator: Generators = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Ancestral sampling ``x_{t-1} ~ p(x_{t-1} | x_t)`` (Ho et al., 2020, Algorithm 2).

    Args:
        diffusion: The (respaced) process; DiT samples with 250 respaced steps.
        model: ``model(x, t_original, y)``.
        noise: ``(B, C, ...)`` standard normal ``x_T``.
        y: Labels.
        generator: Randomness of the ancestral noise (or one generator per image).
        clip_denoised: Clip the x_0 estimate to [-1, 1].

    Returns:
        ``(B, C, ...)`` samples after ``diffusion.num_timesteps`` evaluations.
    """
    x = noise
    for i in reversed(range(diffusion.num_timesteps)):
        out = diffusion.p_mean_variance(model, x, _step(i, x), y, clip_denoised)
        x = out["mean"]
        if i > 0:
            x = x + torch.exp(0.5 * out["log_variance"]) * _randn_like(x, generator)
    return x


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al., 2021, eq. 12); ``eta = 0`` is the deterministic ODE sampler.

    ``sigma_t = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)`` (eq. 16).

    Args:
        diffusion: The (respaced) process, e.g. ``diffusion.respace("ddim50")``.
        model: ``model(x, t_original, y)``.
        noise: ``(B, C, ...)`` standard normal ``x_T``.
        y: Labels.
        eta: Stochasticity, 0 (deterministic) to 1 (DDPM-like).
        generator: Randomness when ``eta > 0``.
        clip_denoised: Clip the x_0 estimate to [-1, 1].

    Returns:
        ``(B, C, ...)`` samples after ``diffusion.num_timesteps`` evaluations.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}; use 0 for deterministic DDIM.")
    x = noise
    for i in reversed(range(diffusion.num_timesteps)):
        t = _step(i, x)
        out = diffusion.p_mean_variance(model, x, t, y, clip_denoised)
        abar = diffusion._extract(diffusion.alphas_cumprod, t, x)
        abar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        x = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * out["eps"]
        if i > 0 and eta > 0:
            x = x + sigma * _randn_like(x, generator)
    return x


@torch.no_grad()
def dpm_solver_pp_2m_sample(
    diffusion: GaussianDiffusion,
    model: Model,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al., 2022, Alg. 2).

    With ``lambda = log(alpha / sigma)``, ``h_i = lambda_{i} - lambda_{i-1}`` and ``r = h_{i-1} / h_i``:
    ``x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i``, with
    ``D_i = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}`` (first order on the first step). The last
    step goes to the clean data (``sigma = 0``) at first order, i.e. returns the final x_0 estimate.

    Args:
        diffusion: The (respaced) process; 10-25 steps are typical.
        model: ``model(x, t_original, y)``.
        noise: ``(B, C, ...)`` standard normal ``x_T``.
        y: Labels.
        clip_denoised: Clip the x_0 estimate to [-1, 1].

    Returns:
        ``(B, C, ...)`` samples after ``diffusion.num_timesteps`` evaluations.
    """
    alpha = diffusion.sqrt_alphas_cumprod
    sigma = diffusion.sqrt_one_minus_alphas_cumprod
    lam = torch.log(alpha / sigma)
    x = noise
    x0_prev: torch.Tensor | None = None
    h_prev = 0.0
    for i in reversed(range(diffusion.num_timesteps)):
        x0 = diffusion.p_mean_variance(model, x, _step(i, x), y, clip_denoised)["pred_xstart"]
        if i == 0:
            return x0  # first-order step to sigma = 0
        h = float(lam[i - 1] - lam[i])
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = float(sigma[i - 1] / sigma[i]) * x - float(alpha[i - 1]) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x
