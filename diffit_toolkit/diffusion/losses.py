"""Likelihood helpers of the variational bound (ADM's ``losses.py``), in torch."""

from __future__ import annotations

import math

import torch

DATA_BIN_HALF_WIDTH = 1.0 / 255.0
"""Half the width of one 8-bit pixel bin for data scaled to [-1, 1] (Ho et al., 2020, eq. 13)."""

LOG_CLAMP_MIN = 1e-12
"""Probabilities are clamped to at least this before taking a log."""


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Args:
        mean1: Mean of the first Gaussian.
        logvar1: Log variance of the first Gaussian.
        mean2: Mean of the second Gaussian.
        logvar2: Log variance of the second Gaussian.

    Returns:
        The elementwise KL, broadcast over the inputs.
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF (the tanh form ADM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of 8-bit data in [-1, 1] under a discretised Gaussian (Ho et al., eq. 13).

    Args:
        x: Targets in [-1, 1] (uint8 images rescaled).
        means: Gaussian means, same shape as ``x``.
        log_scales: Gaussian log standard deviations, same shape as ``x``.

    Returns:
        Elementwise log-likelihoods in nats.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"x, means and log_scales must share a shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)}, {tuple(log_scales.shape)}."
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + DATA_BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - DATA_BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=LOG_CLAMP_MIN))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=LOG_CLAMP_MIN))
    cdf_delta = cdf_plus - cdf_min
    edge = 0.999  # ADM: the outermost bins extend to +-infinity
    return torch.where(
        x < -edge,
        log_cdf_plus,
        torch.where(
            x > edge, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=LOG_CLAMP_MIN))
        ),
    )
