"""Analytic (exact) denoisers for Gaussian-mixture data, used to prove the samplers right.

For ``x_0 ~ sum_k w_k N(m_k, S_k)`` and ``x_t = a x_0 + s n`` with ``n ~ N(0, I)``, the
posterior means ``E[x_0 | x_t]`` and ``E[n | x_t]`` are closed-form: per component, Gaussian
conditioning in the eigenbasis of ``S_k``; across components, a softmax of the component
log-likelihoods. Plugged in as the "model", a correct sampler must reproduce the data's
statistics, with no training involved.

Data live as ``(B, D)``; every model here also accepts ``(B, C, H, W)`` and flattens it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffit_toolkit.diffusion.edm import Precond
from diffit_toolkit.diffusion.gaussian import GaussianDiffusion


@dataclass
class GaussianMixture:
    """A mixture of full-covariance Gaussians in ``D`` dimensions (float64).

    Args:
        means: ``(K, D)`` component means.
        covs: ``(K, D, D)`` symmetric positive definite covariances.
        weights: ``(K,)`` mixture weights (normalised here).
    """

    means: torch.Tensor
    covs: torch.Tensor
    weights: torch.Tensor
    eigvals: torch.Tensor = field(init=False)  # (K, D)
    eigvecs: torch.Tensor = field(init=False)  # (K, D, D)

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covs = torch.as_tensor(self.covs, dtype=torch.float64)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        k, d = self.means.shape
        if self.covs.shape != (k, d, d) or self.weights.shape != (k,):
            raise ValueError(
                f"expected covs (K, D, D) = ({k}, {d}, {d}) and weights ({k},), got "
                f"{tuple(self.covs.shape)} and {tuple(self.weights.shape)}."
            )
        self.weights = self.weights / self.weights.sum()
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)
        if (self.eigvals <= 0).any():
            raise ValueError("every covariance must be positive definite; add a small diagonal.")

    @classmethod
    def gaussian(cls, mean: torch.Tensor, cov: torch.Tensor) -> GaussianMixture:
        """A single Gaussian ``N(mean, cov)``."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        return cls(mean[None], torch.as_tensor(cov, dtype=torch.float64)[None], torch.ones(1))

    @classmethod
    def two_point(cls, center: torch.Tensor, spread: float, weight: float = 0.5) -> GaussianMixture:
        """Modes at ``+center`` (weight ``weight``) and ``-center``, each ``N(., spread^2 I)``."""
        center = torch.as_tensor(center, dtype=torch.float64)
        d = center.shape[0]
        cov = spread**2 * torch.eye(d, dtype=torch.float64)
        return cls(torch.stack([center, -center]), torch.stack([cov, cov]), torch.tensor([weight, 1 - weight]))

    @property
    def dim(self) -> int:
        """Data dimension ``D``."""
        return int(self.means.shape[1])

    def mean(self) -> torch.Tensor:
        """``(D,)`` mean of the mixture."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """``(D, D)`` covariance of the mixture."""
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + torch.einsum("ki,kj->kij", self.means, self.means))
        return second - torch.outer(mu, mu)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``(n, D)`` samples."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)  # (K, D, D)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], z)

    def posterior(
        self, x_t: torch.Tensor, a: torch.Tensor | float, s: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior of ``x_t = a x_0 + s n``: ``E[x_0 | x_t]``, ``diag Var[x_0 | x_t]``, ``E[n | x_t]``.

        Args:
            x_t: ``(B, D)`` observations.
            a: Signal scale, scalar or ``(B,)``.
            s: Noise scale, scalar or ``(B,)``.

        Returns:
            Three ``(B, D)`` float64 tensors.
        """
        x_t = x_t.to(torch.float64)
        b = x_t.shape[0]
        a = torch.as_tensor(a, dtype=torch.float64).expand(b).reshape(b, 1, 1)  # (B, 1, 1)
        s = torch.as_tensor(s, dtype=torch.float64).expand(b).reshape(b, 1, 1)
        lam = self.eigvals[None]  # (1, K, D)
        q = self.eigvecs  # (K, D, D)
        diff = x_t[:, None, :] - a * self.means[None]  # (B, K, D)
        z = torch.einsum("kji,bkj->bki", q, diff)  # rotated into each eigenbasis, (B, K, D)
        var_t = a**2 * lam + s**2  # marginal variances per eigendirection, (B, K, D)
        log_lik = -0.5 * ((z**2 / var_t) + torch.log(2 * math.pi * var_t)).sum(-1)  # (B, K)
        resp = torch.softmax(log_lik + torch.log(self.weights)[None], dim=-1)  # (B, K)
        x0_k = self.means[None] + torch.einsum("kij,bkj->bki", q, a * lam / var_t * z)  # (B, K, D)
        n_k = torch.einsum("kij,bkj->bki", q, s / var_t * z)
        cov_diag_k = torch.einsum("kij,bkj->bki", q**2, lam * s**2 / var_t)  # diag Var[x0 | x_t, k]
        x0_mean = torch.einsum("bk,bki->bi", resp, x0_k)
        x0_var = torch.einsum("bk,bki->bi", resp, cov_diag_k + x0_k**2) - x0_mean**2
        n_mean = torch.einsum("bk,bki->bi", resp, n_k)
        return x0_mean, x0_var.clamp(min=0), n_mean


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)  # (B, D)


class ExactGaussianModel:
    """The optimal network of a
    [`GaussianDiffusion`][diffit_toolkit.diffusion.gaussian.GaussianDiffusion] for mixture data.

    Returns the posterior mean in the diffusion's parametrisation (epsilon, x0 or v) and, with a
    learned variance, the optimal variance ``beta~_t + c1_t^2 diag Var[x_0 | x_t]`` of
    ``p(x_{t-1} | x_t)`` (encoded as ``learned_range`` values or log variances). Built for the
    process it samples with, since the learned range depends on the respaced betas.

    Args:
        data: The data distribution.
        diffusion: The (respaced) process whose steps the model will be called at.
    """

    def __init__(self, data: GaussianMixture, diffusion: GaussianDiffusion) -> None:
        self.data = data
        self.diffusion = diffusion
        self._step_of = torch.full((int(diffusion.timestep_map.max()) + 1,), -1, dtype=torch.long)
        self._step_of[diffusion.timestep_map] = torch.arange(diffusion.num_timesteps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        dif = self.diffusion
        steps = self._step_of[t.detach().round().long().cpu()]  # (B,) step index of each original t
        if (steps < 0).any():
            raise ValueError("the model was called at a timestep its diffusion does not have.")
        a = dif.sqrt_alphas_cumprod[steps]
        s = dif.sqrt_one_minus_alphas_cumprod[steps]
        x0, x0_var, eps = self.data.posterior(_flat(x), a, s)
        if dif.model_mean_type == "epsilon":
            out = eps
        elif dif.model_mean_type == "x0":
            out = x0
        else:
            out = a[:, None] * eps - s[:, None] * x0  # v
        if dif.learns_variance:
            c1 = dif.posterior_mean_coef1[steps][:, None]
            log_var = torch.log(dif.posterior_variance[steps][:, None] + c1**2 * x0_var).clamp(min=-80)
            if dif.model_var_type == "learned_range":
                min_log = dif.posterior_log_variance_clipped[steps][:, None]
                max_log = torch.log(dif.betas[steps])[:, None]
                span = max_log - min_log
                safe = span.abs() > 1e-12
                frac = torch.where(safe, (log_var - min_log) / torch.where(safe, span, 1.0), 0.0)
                var_out = 2 * frac - 1
            else:
                var_out = log_var
            out = torch.cat([out, var_out], dim=1)
        return out.reshape(x.shape[0], -1, *x.shape[2:]).to(x.dtype)


class ExactEDMDenoiser:
    """The optimal EDM denoiser ``D(x, sigma) = E[x_0 | x_0 + sigma n = x]`` of mixture data."""

    def __init__(self, data: GaussianMixture) -> None:
        self.data = data

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x0, _, _ = self.data.posterior(_flat(x), 1.0, torch.as_tensor(sigma, dtype=torch.float64).flatten())
        return x0.reshape(x.shape).to(x.dtype)


class ExactEDMRawNetwork:
    """The raw network ``F`` that makes ``EDMDenoiser(F, precond)`` the optimal denoiser.

    It inverts the preconditioning: ``sigma`` from ``c_noise``, ``x = x_in / c_in``, and returns
    ``(D*(x, sigma) - c_skip x) / c_out``.
    """

    def __init__(self, data: GaussianMixture, precond: Precond) -> None:
        self.denoiser = ExactEDMDenoiser(data)
        self.precond = precond

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        p = self.precond
        sigma = p.sigma_from_c_noise(c_noise.to(torch.float64))  # (B,)
        s = sigma.reshape(-1, *([1] * (x_in.ndim - 1)))
        x = x_in.to(torch.float64) / p.c_in(s)
        d = self.denoiser(x, sigma, y)
        return ((d - p.c_skip(s) * x) / p.c_out(s)).to(x_in.dtype)


class ExactFlowVelocity:
    """The optimal velocity ``E[x_data - n | x_t]`` for ``x_t = t x_data + (1 - t) n`` (SiT convention)."""

    def __init__(self, data: GaussianMixture) -> None:
        self.data = data

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=torch.float64).flatten()
        x0, _, n = self.data.posterior(_flat(x), tt, 1 - tt)
        return (x0 - n).reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class SampleErrors:
    """How far samples are from the data distribution.

    Attributes:
        mean_error: ``max_i |mean_hat_i - mean_i|``.
        cov_rel_error: ``||C_hat - C||_F / ||C||_F``.
        mode_weight_error: ``|share of samples nearest the first mode - its weight|`` (mixtures).
        spread_rel_error: Largest relative error of the within-mode standard deviation (mixtures).
    """

    mean_error: float
    cov_rel_error: float
    mode_weight_error: float = 0.0
    spread_rel_error: float = 0.0


def sample_errors(samples: torch.Tensor, data: GaussianMixture) -> SampleErrors:
    """Compare ``(N, D)`` (or ``(N, C, H, W)``) samples with the data's statistics.

    For a two-component mixture, samples are assigned to the nearest mean; the share of the
    first mode and the within-mode standard deviation (pooled over dimensions) are compared with
    the truth.
    """
    x = _flat(samples).to(torch.float64)
    mean_err = float((x.mean(0) - data.mean()).abs().max())
    cov = torch.cov(x.T).reshape(data.dim, data.dim)
    true_cov = data.covariance()
    cov_err = float(torch.linalg.norm(cov - true_cov) / torch.linalg.norm(true_cov))
    if data.means.shape[0] != 2:
        return SampleErrors(mean_err, cov_err)
    nearest = torch.cdist(x, data.means).argmin(dim=1)  # (N,)
    weight_err = float(((nearest == 0).double().mean() - data.weights[0]).abs())
    spread_errs = []
    for k in range(2):
        xk = x[nearest == k]
        std_hat = (xk - xk.mean(0)).pow(2).mean().sqrt()
        std_true = data.covs[k].diagonal().mean().sqrt()
        spread_errs.append(float((std_hat / std_true - 1).abs()))
    return SampleErrors(mean_err, cov_err, weight_err, max(spread_errs))
