"""EDM preconditioning formulas (Table 1) and the diffusers scheduler bridge."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffit_toolkit.diffusion import (
    EDMLoss,
    EDMPrecond,
    ExactGaussianModel,
    GaussianDiffusion,
    VELoss,
    VEPrecond,
    VPLoss,
    VPPrecond,
    karras_sigmas,
    sample_errors,
)
from diffit_toolkit.sampling import ddpm_sample, diffusers_sample
from diffit_toolkit.sampling.exact_report import correlated_gaussian, seeded_noise

SIGMAS = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)


def test_edm_precond_table1_values() -> None:
    p, sd = EDMPrecond(), 0.5
    for s in SIGMAS.tolist():
        sig = torch.tensor(s, dtype=torch.float64)
        assert p.c_skip(sig).item() == pytest.approx(sd**2 / (s**2 + sd**2))
        assert p.c_out(sig).item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2))
        assert p.c_in(sig).item() == pytest.approx(1 / math.sqrt(s**2 + sd**2))
        assert p.c_noise(sig).item() == pytest.approx(math.log(s) / 4)
        ve = VEPrecond()
        assert (ve.c_skip(sig).item(), ve.c_out(sig).item(), ve.c_in(sig).item()) == (1.0, s, 1.0)
        assert ve.c_noise(sig).item() == pytest.approx(math.log(s / 2))
        vp = VPPrecond()
        assert (vp.c_skip(sig).item(), vp.c_out(sig).item()) == (1.0, -s)
        assert vp.c_in(sig).item() == pytest.approx(1 / math.sqrt(s**2 + 1))
        t = vp.c_noise(sig).item() / 999  # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        assert math.sqrt(math.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1) == pytest.approx(s, rel=1e-9)


def test_edm_precond_gives_unit_variance_input_and_target() -> None:
    """EDM App. B.6: with data std sigma_data, c_in x and the effective target of F have unit variance."""
    p, sd = EDMPrecond(), 0.5
    g = torch.Generator().manual_seed(0)
    y = sd * torch.randn(200_000, generator=g, dtype=torch.float64)
    n = torch.randn(200_000, generator=g, dtype=torch.float64)
    for s in (0.05, 1.0, 20.0):
        sig = torch.tensor(s, dtype=torch.float64)
        x = y + s * n
        assert (p.c_in(sig) * x).var().item() == pytest.approx(1.0, rel=0.02)
        target = (y - p.c_skip(sig) * x) / p.c_out(sig)
        assert target.var().item() == pytest.approx(1.0, rel=0.02)


def test_loss_weights_are_one_over_c_out_squared() -> None:
    for loss, precond in ((EDMLoss(), EDMPrecond()), (VPLoss(), VPPrecond()), (VELoss(), VEPrecond())):
        torch.testing.assert_close(loss.weight(SIGMAS) * precond.c_out(SIGMAS) ** 2, torch.ones_like(SIGMAS))


def test_karras_sigmas_follow_eq5() -> None:
    s = karras_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002)
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0)


def test_edm_loss_sigma_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    log_s = torch.log(EDMLoss().sample_sigma(50_000, g))
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.03) and log_s.std().item() == pytest.approx(1.2, abs=0.03)
    ve = VELoss().sample_sigma(50_000, g)
    assert ve.min().item() >= 0.02 and ve.max().item() <= 100.0
    vp = VPLoss().sample_sigma(50_000, g)
    assert vp.max().item() <= math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1) + 1e-9


def _learned_range_model() -> tuple[GaussianDiffusion, ExactGaussianModel]:
    dif = GaussianDiffusion.from_schedule("linear")  # eps + learned range, 2C outputs
    return dif, ExactGaussianModel(correlated_gaussian(), dif)


def test_bridge_learned_range_ddpm_matches_toolkit_ddpm() -> None:
    """diffusers' DDPM with variance_type learned_range gets all 2C channels and follows our DDPM."""
    dif, model = _learned_range_model()
    data = correlated_gaussian()
    noise = seeded_noise(4000, 3, 0)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type="learned_range"
    )
    ours = ddpm_sample(dif, model, noise, generator=torch.Generator().manual_seed(1))
    theirs = diffusers_sample(scheduler, model, noise, num_inference_steps=1000, generator=torch.Generator().manual_seed(1))
    e_ours, e_theirs = sample_errors(ours, data), sample_errors(theirs, data)
    assert e_theirs.cov_rel_error < 0.06 and e_theirs.mean_error < 0.05
    assert abs(e_theirs.cov_rel_error - e_ours.cov_rel_error) < 0.03


def test_bridge_cuts_learned_variance_for_fixed_variance_schedulers() -> None:
    _, model = _learned_range_model()
    noise = seeded_noise(8, 3, 0)
    seen: list[int] = []

    def spy(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = model(x, t, y)
        seen.append(out.shape[1])
        assert t.shape == (8,) and int(t[0]) in range(1000)
        return out

    for scheduler in (
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False),
        DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
    ):
        x = diffusers_sample(scheduler, spy, noise, num_inference_steps=5)
        assert x.shape == noise.shape and torch.isfinite(x).all()
    assert set(seen) == {6}


def test_bridge_seeded_and_rejects_unknown_step_arguments() -> None:
    _, model = _learned_range_model()
    noise = seeded_noise(16, 3, 0)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    a = diffusers_sample(sched, model, noise, num_inference_steps=10, generator=torch.Generator().manual_seed(3), step_kwargs={"eta": 1.0})
    b = diffusers_sample(sched, model, noise, num_inference_steps=10, generator=torch.Generator().manual_seed(3), step_kwargs={"eta": 1.0})
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not take"):
        diffusers_sample(sched, model, noise, num_inference_steps=10, step_kwargs={"churn": 1.0})
