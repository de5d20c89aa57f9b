"""EDM (Karras et al., 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

Preconditionings and losses of the paper's Table 1, one small class each. The raw network ``F``
is called as ``F(c_in * x, c_noise, y)``; the denoiser ``D(x, sigma, y) = c_skip x + c_out F``
(eq. 7) is what the Heun sampler
([`diffit_toolkit.sampling.edm_heun_sample`][diffit_toolkit.sampling.edm_sampler.edm_heun_sample])
uses.
Data is noised as ``x = y + sigma n`` (the sigma form; VP's scaling ``s(t)`` lives in ``c_in``).
"""

from __future__ import annotations

import math

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from diffit_toolkit.diffusion.gaussian import mean_flat

SIGMA_DATA = 0.5
"""Standard deviation of the data distribution assumed by EDM's preconditioning."""
SIGMA_MIN = 0.002
"""Smallest noise level of the EDM sampler."""
SIGMA_MAX = 80.0
"""Largest noise level of the EDM sampler."""
RHO = 7.0
"""Exponent of the EDM time-step discretisation (eq. 5)."""
EDM_STEPS_CIFAR10 = 18
"""Heun steps for CIFAR-10 (35 network evaluations)."""
EDM_STEPS_FFHQ64 = 40
"""Heun steps for FFHQ / AFHQv2 64x64 (79 network evaluations)."""
VP_BETA_D = 19.9
"""VP's beta_d (Song et al., 2021; EDM Table 1)."""
VP_BETA_MIN = 0.1
"""VP's beta_min (Song et al., 2021; EDM Table 1)."""
VP_EPSILON_T = 1e-5
"""VP's smallest training time (EDM Table 1)."""
VP_M = 1000
"""VP's number of discrete timesteps used by ``c_noise`` (EDM Table 1)."""
VE_SIGMA_MIN = 0.02
"""VE's smallest training sigma (EDM Table 1)."""
VE_SIGMA_MAX = 100.0
"""VE's largest training sigma (EDM Table 1)."""
EDM_P_MEAN = -1.2
"""Mean of ln(sigma) during EDM training (Table 1)."""
EDM_P_STD = 1.2
"""Standard deviation of ln(sigma) during EDM training (Table 1)."""

RawNetwork = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""The raw network ``F(c_in * x, c_noise, y)``."""


class Precond(Protocol):
    """A preconditioning: the four scalings of EDM's eq. 7 as functions of sigma."""

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor: ...
    def c_out(self, sigma: torch.Tensor) -> torch.Tensor: ...
    def c_in(self, sigma: torch.Tensor) -> torch.Tensor: ...
    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor: ...
    def sigma_from_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor: ...


def vp_sigma(t: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """VP's ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` (Table 1)."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Inverse of [`vp_sigma`][diffit_toolkit.diffusion.edm.vp_sigma]: ``t = (sqrt(beta_min^2 + 2
    beta_d ln(1 + sigma^2)) - beta_min) / beta_d``."""
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d


@dataclass(frozen=True)
class VPPrecond:
    """Variance preserving preconditioning (Song et al., 2021), EDM Table 1, column VP."""

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN
    M: int = VP_M

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)  # Table 1: c_skip = 1

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return -sigma  # Table 1: c_out = -sigma

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / torch.sqrt(sigma**2 + 1)  # Table 1: c_in = 1 / sqrt(sigma^2 + 1)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)  # Table 1: (M-1) sigma^-1(sigma)

    def sigma_from_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return vp_sigma(c_noise / (self.M - 1), self.beta_d, self.beta_min)

    @property
    def sigma_min(self) -> float:
        """Smallest trained noise level, ``sigma(epsilon_t)`` (NVlabs/edm ``VPPrecond.sigma_min``)."""
        return float(vp_sigma(torch.tensor(VP_EPSILON_T, dtype=torch.float64), self.beta_d, self.beta_min))

    @property
    def sigma_max(self) -> float:
        """Largest trained noise level, ``sigma(1)``."""
        return float(vp_sigma(torch.tensor(1.0, dtype=torch.float64), self.beta_d, self.beta_min))


@dataclass(frozen=True)
class VEPrecond:
    """Variance exploding preconditioning (Song et al., 2021), EDM Table 1, column VE."""

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)  # Table 1: c_skip = 1

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma  # Table 1: c_out = sigma

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)  # Table 1: c_in = 1

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(0.5 * sigma)  # Table 1: c_noise = ln(sigma / 2)

    def sigma_from_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return 2 * torch.exp(c_noise)

    #: The trained noise range (NVlabs/edm ``VEPrecond``).
    sigma_min: float = VE_SIGMA_MIN
    sigma_max: float = VE_SIGMA_MAX


@dataclass(frozen=True)
class EDMPrecond:
    """EDM's own preconditioning, Table 1, column "ours" (derived in Appendix B.6)."""

    sigma_data: float = SIGMA_DATA

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)  # Table 1 (App. B.6)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)  # Table 1 (App. B.6)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / torch.sqrt(sigma**2 + self.sigma_data**2)  # Table 1 (App. B.6)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(sigma) / 4  # Table 1: c_noise = ln(sigma) / 4

    def sigma_from_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return torch.exp(4 * c_noise)

    #: EDM's preconditioning supports every noise level (NVlabs/edm: 0 and inf).
    sigma_min: float = 0.0
    sigma_max: float = math.inf


def sampling_sigma_range(precond: object, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> tuple[float, float]:
    """The Heun sampler's sigma range clamped to what ``precond`` was trained on, as NVlabs/edm
    does: ``max(sigma_min, precond.sigma_min)``, ``min(sigma_max, precond.sigma_max)``. With the
    defaults: VE 0.02 .. 80 (trained 0.02 .. 100), VP 0.002 .. 80 (trained about 0.001 .. 152),
    EDM 0.002 .. 80."""
    return (max(sigma_min, float(getattr(precond, "sigma_min", 0.0))),
            min(sigma_max, float(getattr(precond, "sigma_max", math.inf))))


def _per_sample(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast sigma (scalar or ``(B,)``) to ``(B, 1, ..., 1)``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class EDMDenoiser(nn.Module):
    """The denoiser ``D(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, y)`` (EDM eq. 7).

    Args:
        net: The raw network ``F(x, c_noise, y)``, ``c_noise`` of shape ``(B,)``.
        precond: [`VPPrecond`][diffit_toolkit.diffusion.edm.VPPrecond],
            [`VEPrecond`][diffit_toolkit.diffusion.edm.VEPrecond] or
            [`EDMPrecond`][diffit_toolkit.diffusion.edm.EDMPrecond].
    """

    def __init__(self, net: RawNetwork, precond: Precond) -> None:
        super().__init__()
        self.net = net
        self.precond = precond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x`` ``(B, C, ...)`` at noise level ``sigma`` (scalar or ``(B,)``)."""
        s = _per_sample(sigma, x)  # (B, 1, ..., 1)
        p = self.precond
        f_x = self.net(p.c_in(s) * x, p.c_noise(s).flatten(), y)
        return p.c_skip(s) * x + p.c_out(s) * f_x


Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""A denoiser ``D(x, sigma, y)`` returning the x_0 estimate."""


def _weighted_loss(
    denoiser: Denoiser, x0: torch.Tensor, sigma: torch.Tensor, weight: torch.Tensor,
    y: torch.Tensor | None, generator: torch.Generator | None,
) -> torch.Tensor:
    n = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * sigma
    d = denoiser(x0 + n, sigma.flatten(), y)
    return mean_flat(weight * (d - x0) ** 2)  # EDM eq. 8: lambda(sigma) ||D(y + n; sigma) - y||^2, (B,)


class _SigmaLoss:
    """Shared call of the EDM losses: draw sigma, noise the data, weight the denoising error."""

    def sample_sigma(self, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, y: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss ``(B,)``; ``sigma`` ``(B,)`` overrides the sampled noise levels."""
        if sigma is None:
            sigma = self.sample_sigma(x0.shape[0], generator, x0.device)
        s = _per_sample(sigma, x0)
        return _weighted_loss(denoiser, x0, s, self.weight(s), y, generator)


@dataclass(frozen=True)
class VPLoss(_SigmaLoss):
    """VP training: ``t ~ U(eps_t, 1)``, ``sigma = sigma(t)``, ``lambda = 1 / sigma^2`` (Table 1)."""

    beta_d: float = VP_BETA_D
    beta_min: float = VP_BETA_MIN
    epsilon_t: float = VP_EPSILON_T

    def sample_sigma(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        t = self.epsilon_t + (1 - self.epsilon_t) * torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2  # Table 1: lambda(sigma) = 1 / sigma^2


@dataclass(frozen=True)
class VELoss(_SigmaLoss):
    """VE training: ``ln sigma ~ U(ln sigma_min, ln sigma_max)``, ``lambda = 1 / sigma^2`` (Table 1)."""

    sigma_min: float = VE_SIGMA_MIN
    sigma_max: float = VE_SIGMA_MAX

    def sample_sigma(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma**2  # Table 1: lambda(sigma) = 1 / sigma^2


@dataclass(frozen=True)
class EDMLoss(_SigmaLoss):
    """EDM training: ``ln sigma ~ N(P_mean, P_std^2)``, ``lambda = (sigma^2 + sd^2) / (sigma sd)^2`` (Table 1)."""

    p_mean: float = EDM_P_MEAN
    p_std: float = EDM_P_STD
    sigma_data: float = SIGMA_DATA

    def sample_sigma(self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.exp(self.p_mean + self.p_std * torch.randn(batch, generator=generator, device=device, dtype=torch.float64))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2  # Table 1 (= 1 / c_out^2)


def karras_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """EDM's noise levels (eq. 5) with ``t_N = 0`` appended: ``(num_steps + 1,)``, decreasing."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}; EDM uses 18 (CIFAR-10) or 40 (FFHQ-64).")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho  # eq. 5
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(device=device, dtype=dtype)


def heun_evaluations(num_steps: int) -> int:
    """Network evaluations of the deterministic Heun sampler: ``2 N - 1`` (no correction at t_N = 0)."""
    return 2 * num_steps - 1
