"""Each sampler, driven by the analytic optimal model, reproduces the data's statistics.

Data: a correlated 3-D Gaussian (eigenvalues 0.047..0.67) and a two-point mixture (weights
0.3 / 0.7, within-mode std 0.15). Tolerances (stated per case below) sit above the measured error
(docs/diffusion.md) and the sampling noise of 8000 samples (mean ~0.01, covariance ~2%), and far
below what a wrong sampler gives (e.g. DDIM with 10 steps: 40% covariance error).
"""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.diffusion import (
    ExactEDMDenoiser,
    ExactFlowVelocity,
    ExactGaussianModel,
    GaussianDiffusion,
    sample_errors,
)
from diffit_toolkit.sampling import (
    ddim_sample,
    ddpm_sample,
    dpm_solver_pp_2m_sample,
    edm_heun_sample,
    flow_euler_sample,
    flow_heun_sample,
)
from diffit_toolkit.sampling.exact_report import (
    SamplerCase,
    correlated_gaussian,
    report_cases,
    run_case,
    seeded_noise,
    two_point_mixture,
)

NUM = 8000
MEAN_TOL = 0.04
MODE_WEIGHT_TOL = 0.03

# name -> (Gaussian covariance rel. tol., mixture within-mode spread rel. tol.)
TOLERANCES = {
    "DDPM ancestral, learned range (250 respaced)": (0.05, 0.05),
    "DDIM eta=0 (250 respaced)": (0.05, 0.06),
    "DDIM eta=1 (250 respaced)": (0.06, 0.13),
    "DPM-Solver++(2M), v-prediction (logsnr20)": (0.10, 0.08),
    "EDM Heun, 40 steps": (0.08, 0.05),
    "EDM Heun, 40 steps, S_churn=10": (0.08, 0.06),
    "Flow Euler, 250 steps": (0.05, 0.04),
    "Flow Heun, 25 steps": (0.06, 0.04),
    "diffusers DDPMScheduler, 250 steps": (0.06, 0.13),
    "diffusers DDIMScheduler, 100 steps": (0.05, 0.10),
    # diffusers' default DPM-Solver timesteps are uniform in t: coarse at low noise, so the
    # 0.15-std modes come out ~30% too wide at 25 steps; only the mode weights are checked.
    "diffusers DPMSolverMultistepScheduler, 25 steps": (0.08, None),
}
CASES = [c for c in report_cases() if c.name in TOLERANCES]
assert len(CASES) == len(TOLERANCES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sampler_matches_gaussian_and_mixture(case: SamplerCase) -> None:
    cov_tol, spread_tol = TOLERANCES[case.name]
    _, eg = run_case(case, correlated_gaussian(), NUM, seed=0)
    assert eg.mean_error < MEAN_TOL, eg
    assert eg.cov_rel_error < cov_tol, eg
    _, em = run_case(case, two_point_mixture(), NUM, seed=0)
    assert em.mean_error < MEAN_TOL, em
    assert em.mode_weight_error < MODE_WEIGHT_TOL, em
    if spread_tol is not None:
        assert em.spread_rel_error < spread_tol, em


def test_too_few_steps_is_detected() -> None:
    """The check can fail: 10 DDIM steps miss the covariance by far more than the tolerance."""
    data = correlated_gaussian()
    dif = GaussianDiffusion.from_schedule("linear", model_var_type="fixed_small").respace(10)
    samples = ddim_sample(dif, ExactGaussianModel(data, dif), seeded_noise(NUM, 3, 0))
    assert sample_errors(samples, data).cov_rel_error > 0.2


def _gauss_dif(steps: int | str) -> tuple[GaussianDiffusion, ExactGaussianModel]:
    dif = GaussianDiffusion.from_schedule("linear").respace(steps)
    return dif, ExactGaussianModel(two_point_mixture(), dif)


def test_ode_samplers_are_deterministic_given_noise() -> None:
    noise = seeded_noise(256, 3, 4)
    dif, model = _gauss_dif(20)
    data = two_point_mixture()
    runs = {
        "ddim": lambda: ddim_sample(dif, model, noise, eta=0.0),
        "dpm": lambda: dpm_solver_pp_2m_sample(dif, model, noise),
        "heun": lambda: edm_heun_sample(ExactEDMDenoiser(data), noise, num_steps=10),
        "flow_euler": lambda: flow_euler_sample(ExactFlowVelocity(data), noise, num_steps=10),
        "flow_heun": lambda: flow_heun_sample(ExactFlowVelocity(data), noise, num_steps=10),
    }
    for name, run in runs.items():
        assert torch.equal(run(), run()), name


def test_same_seed_same_samples_and_different_seed_differs() -> None:
    noise = seeded_noise(256, 3, 4)
    dif, model = _gauss_dif(20)
    data = two_point_mixture()
    stochastic = {
        "ddpm": lambda g: ddpm_sample(dif, model, noise, generator=g),
        "ddim_eta1": lambda g: ddim_sample(dif, model, noise, eta=1.0, generator=g),
        "heun_churn": lambda g: edm_heun_sample(ExactEDMDenoiser(data), noise, num_steps=10, s_churn=5.0, generator=g),
    }
    for name, run in stochastic.items():
        a = run(torch.Generator().manual_seed(123))
        b = run(torch.Generator().manual_seed(123))
        c = run(torch.Generator().manual_seed(124))
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


class _Counter:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.mark.parametrize(("steps", "evals"), [(18, 35), (40, 79)])
def test_heun_evaluation_counts_match_edm(steps: int, evals: int) -> None:
    counter = _Counter(ExactEDMDenoiser(two_point_mixture()))
    edm_heun_sample(counter, seeded_noise(4, 3, 0), num_steps=steps)
    assert counter.calls == evals


def test_gaussian_and_flow_evaluation_counts() -> None:
    dif, model = _gauss_dif(25)
    noise = seeded_noise(4, 3, 0)
    for sampler, expected in ((ddpm_sample, 25), (ddim_sample, 25), (dpm_solver_pp_2m_sample, 25)):
        counter = _Counter(model)
        sampler(dif, counter, noise)
        assert counter.calls == expected, sampler.__name__
    velocity = ExactFlowVelocity(two_point_mixture())
    for sampler, expected in ((flow_euler_sample, 10), (flow_heun_sample, 20)):
        counter = _Counter(velocity)
        sampler(counter, noise, num_steps=10)
        assert counter.calls == expected, sampler.__name__
