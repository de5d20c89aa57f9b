"""EDM's Heun sampler (Karras et al., 2022, Algorithm 2), deterministic or with stochastic churn."""

from __future__ import annotations

import math

import torch

from diffit_toolkit.diffusion.edm import (
    EDM_STEPS_CIFAR10,
    RHO,
    SIGMA_MAX,
    SIGMA_MIN,
    Denoiser,
    karras_sigmas,
)
from diffit_toolkit.sampling.noise import Generators, randn


@torch.no_grad()
def edm_heun_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    num_steps: int = EDM_STEPS_CIFAR10,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generators = None,
) -> torch.Tensor:
    """Heun's 2nd-order sampler on ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM Algorithm 2).

    Costs ``2 N - 1`` evaluations: 18 steps = 35 (CIFAR-10), 40 steps = 79 (FFHQ-64).
    ``s_churn = 0`` gives the deterministic sampler.

    Args:
        denoiser: ``D(x, sigma, y)``, e.g. an [`EDMDenoiser`][diffit_toolkit.diffusion.edm.EDMDenoiser].
        noise: ``(B, C, ...)`` standard normal latents (scaled by ``sigma_max`` here).
        y: Labels.
        num_steps: ``N``.
        sigma_min: Smallest noise level.
        sigma_max: Largest noise level.
        rho: Discretisation exponent (eq. 5).
        s_churn: Total churn; ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` inside ``[s_tmin, s_tmax]``.
        s_tmin: Lowest sigma that gets churn.
        s_tmax: Highest sigma that gets churn.
        s_noise: Scale of the churn noise.
        generator: Randomness of the churn.

    Returns:
        ``(B, C, ...)`` samples.
    """
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}; use 0 for the deterministic sampler.")
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype=noise.dtype, device=noise.device)
    x_next = noise * t_steps[0]
    gamma_max = min(s_churn / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        # Algorithm 2, lines 4-6: increase the noise temporarily.
        gamma = gamma_max if s_tmin <= float(t_cur) <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = s_noise * randn(x_cur.shape, generator, x_cur.device, x_cur.dtype)
            x_hat = x_cur + torch.sqrt(t_hat**2 - t_cur**2) * eps
        # Lines 7-8: Euler step.
        d_cur = (x_hat - denoiser(x_hat, t_hat.expand(x_hat.shape[0]), y)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Lines 9-11: second-order correction unless t_next = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoiser(x_next, t_next.expand(x_next.shape[0]), y)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
