"""The training loss of the analytic (perfect) model equals its theoretical value, and is minimal.

Data ``x0 ~ N(mu, S)``; the posterior covariance of Gaussian conditioning is written here
directly with matrix inverses (independent of the eigenbasis code in ``exact.py``).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffit_toolkit.diffusion import (
    EDMDenoiser,
    EDMLoss,
    EDMPrecond,
    ExactEDMDenoiser,
    ExactEDMRawNetwork,
    ExactFlowVelocity,
    ExactGaussianModel,
    GaussianDiffusion,
    LinearFlow,
    VELoss,
    VEPrecond,
    VPLoss,
    VPPrecond,
)
from diffit_toolkit.sampling.exact_report import correlated_gaussian

N = 20_000
REL_TOL = 0.03  # Monte Carlo: relative standard error of these means is below 1%
DATA = correlated_gaussian()
S = DATA.covs[0]
I3 = torch.eye(3, dtype=torch.float64)


def _x0(seed: int) -> torch.Tensor:
    return DATA.sample(N, torch.Generator().manual_seed(seed)).reshape(N, 3, 1, 1)


def _posterior_cov(a: float, s: float) -> torch.Tensor:
    """Cov[x0 | a x0 + s n] = S - a^2 S (a^2 S + s^2 I)^-1 S."""
    return S - a**2 * S @ torch.linalg.inv(a**2 * S + s**2 * I3) @ S


@pytest.mark.parametrize("step", [1, 300, 900])
def test_hybrid_loss_of_exact_model_is_theoretical_and_minimal(step: int) -> None:
    dif = GaussianDiffusion.from_schedule("linear", 1000, model_var_type="learned_range", loss_type="mse")
    model = ExactGaussianModel(DATA, dif)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    a, s = abar[step].sqrt().item(), (1 - abar[step]).sqrt().item()
    # MSE on epsilon: E Var[eps | x_t] per dim = tr(I - s^2 (a^2 S + s^2 I)^-1) / D.
    mse_theory = (I3 - s**2 * torch.linalg.inv(a**2 * S + s**2 * I3)).trace().item() / 3
    # VB term: with the optimal variance beta~ + c1^2 P_ii, the expected KL per dim is
    # 0.5 log(1 + c1^2 P_ii / beta~), in bits.
    post_var = (betas[step] * (1 - abar[step - 1]) / (1 - abar[step])).item()
    c1 = (abar[step - 1].sqrt() * betas[step] / (1 - abar[step])).item()
    p_diag = _posterior_cov(a, s).diagonal()
    vb_theory = (0.5 * torch.log1p(c1**2 * p_diag / post_var)).mean().item() / math.log(2)

    t = torch.full((N,), step)
    x0 = _x0(step)
    terms = dif.training_losses(model, x0, t, generator=torch.Generator().manual_seed(7))
    assert terms["mse"].mean().item() == pytest.approx(mse_theory, rel=REL_TOL)
    assert terms["vb"].mean().item() == pytest.approx(vb_theory, rel=REL_TOL)
    assert terms["loss"].mean().item() == pytest.approx(mse_theory + vb_theory, rel=REL_TOL)

    # Minimal: a wrong mean or a wrong variance costs more on the same noise.
    def biased_mean(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = model(x, tt, y)
        return torch.cat([1.1 * out[:, :3], out[:, 3:]], dim=1)

    def biased_var(x: torch.Tensor, tt: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = model(x, tt, y)
        return torch.cat([out[:, :3], out[:, 3:] + 0.3], dim=1)

    base = terms["loss"].mean()
    for worse in (biased_mean, biased_var):
        other = dif.training_losses(worse, x0, t, generator=torch.Generator().manual_seed(7))["loss"].mean()
        assert other > base


@pytest.mark.parametrize(
    ("loss", "precond"),
    [(EDMLoss(), EDMPrecond()), (VPLoss(), VPPrecond()), (VELoss(), VEPrecond())],
    ids=["edm", "vp", "ve"],
)
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_edm_losses_of_exact_denoiser_are_theoretical(loss, precond, sigma: float) -> None:
    denoiser = EDMDenoiser(ExactEDMRawNetwork(DATA, precond), precond)
    x0 = _x0(11)
    sig = torch.full((N,), sigma, dtype=torch.float64)
    got = loss(denoiser, x0, generator=torch.Generator().manual_seed(3), sigma=sig).mean().item()
    weight = loss.weight(torch.tensor(sigma, dtype=torch.float64)).item()
    theory = weight * _posterior_cov(1.0, sigma).trace().item() / 3  # lambda(sigma) E||D* - y||^2 / D
    assert got == pytest.approx(theory, rel=REL_TOL)
    worse = loss(lambda x, sg, y: 1.05 * denoiser(x, sg, y), x0, generator=torch.Generator().manual_seed(3), sigma=sig)
    assert worse.mean().item() > got


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_flow_loss_of_exact_velocity_is_theoretical(t: float) -> None:
    flow = LinearFlow()
    x0 = _x0(5)
    tt = torch.full((N,), t, dtype=torch.float64)
    got = flow.training_loss(ExactFlowVelocity(DATA), x0, generator=torch.Generator().manual_seed(2), t=tt).mean().item()
    # u = x - n, x_t = t x + (1 - t) n: Cov[u | x_t] = (S + I) - C V^-1 C^T.
    c = t * S - (1 - t) * I3
    v = t**2 * S + (1 - t) ** 2 * I3
    theory = ((S + I3) - c @ torch.linalg.inv(v) @ c.T).trace().item() / 3
    assert got == pytest.approx(theory, rel=REL_TOL)


def test_exact_raw_network_through_preconditioning_is_the_exact_denoiser() -> None:
    x = torch.randn(64, 3, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.logspace(-2, 1.5, 64, dtype=torch.float64)
    expected = ExactEDMDenoiser(DATA)(x, sigma)
    for precond in (EDMPrecond(), VPPrecond(), VEPrecond()):
        torch.testing.assert_close(EDMDenoiser(ExactEDMRawNetwork(DATA, precond), precond)(x, sigma), expected)
