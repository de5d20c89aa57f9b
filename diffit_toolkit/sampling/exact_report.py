"""Exact-denoiser report: every sampler driven by the analytic optimal model of known data.

Run ``python -m diffit_toolkit.sampling.exact_report`` to print the table in ``docs/diffusion.md``.
The data are a correlated 3-D Gaussian and a two-point mixture; each sampler starts from the same
seeded noise, and the errors are those of [`sample_errors`][diffit_toolkit.diffusion.exact.sample_errors].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffit_toolkit.diffusion.edm import EDM_STEPS_CIFAR10, EDM_STEPS_FFHQ64, heun_evaluations
from diffit_toolkit.diffusion.exact import (
    ExactEDMDenoiser,
    ExactFlowVelocity,
    ExactGaussianModel,
    GaussianMixture,
    SampleErrors,
    sample_errors,
)
from diffit_toolkit.diffusion.gaussian import GaussianDiffusion
from diffit_toolkit.sampling.diffusers_bridge import diffusers_sample
from diffit_toolkit.sampling.edm_sampler import edm_heun_sample
from diffit_toolkit.sampling.flow_samplers import flow_euler_sample, flow_heun_sample
from diffit_toolkit.sampling.gaussian_samplers import ddim_sample, ddpm_sample, dpm_solver_pp_2m_sample

REPORT_NUM_SAMPLES = 10_000
"""Samples per sampler in the report (and the tests)."""

DDPM_STEPS = 250
"""DiT samples with 250 respaced DDPM steps."""


def correlated_gaussian() -> GaussianMixture:
    """``N(mu, Sigma)`` in 3-D with correlated Sigma, eigenvalues about 0.047, 0.110, 0.673."""
    a = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.3]], dtype=torch.float64)
    cov = 0.5 * a @ a.T + 0.02 * torch.eye(3, dtype=torch.float64)
    return GaussianMixture.gaussian(torch.tensor([0.5, -0.3, 0.2]), cov)


def two_point_mixture() -> GaussianMixture:
    """Modes at ``+-(0.8, -0.5, 0.4)`` with weights 0.3 / 0.7, each with standard deviation 0.15."""
    return GaussianMixture.two_point(torch.tensor([0.8, -0.5, 0.4]), spread=0.15, weight=0.3)


def seeded_noise(num_samples: int, dim: int, seed: int) -> torch.Tensor:
    """``(N, D, 1, 1)`` float64 standard normal noise from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_samples, dim, 1, 1, generator=g, dtype=torch.float64)


Sampler = Callable[[GaussianMixture, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class SamplerCase:
    """A sampler configuration of the report.

    Attributes:
        name: Row label.
        evaluations: Network evaluations per sample.
        run: ``run(data, noise, generator) -> samples``.
    """

    name: str
    evaluations: int
    run: Sampler


def _gaussian(respacing: int | str, var_type: str = "learned_range", mean_type: str = "epsilon") -> GaussianDiffusion:
    base = GaussianDiffusion.from_schedule("linear", model_mean_type=mean_type, model_var_type=var_type)  # type: ignore[arg-type]
    return base.respace(respacing)


def _ddpm(data: GaussianMixture, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    dif = _gaussian(DDPM_STEPS)
    return ddpm_sample(dif, ExactGaussianModel(data, dif), noise, generator=g)


def _ddim(steps: int | str, eta: float, mean_type: str = "epsilon") -> Sampler:
    def run(data: GaussianMixture, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        dif = _gaussian(steps, "fixed_small", mean_type)
        return ddim_sample(dif, ExactGaussianModel(data, dif), noise, eta=eta, generator=g)

    return run


def _dpm(steps: str) -> Sampler:
    def run(data: GaussianMixture, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        dif = _gaussian(steps, "fixed_small", "v")
        return dpm_solver_pp_2m_sample(dif, ExactGaussianModel(data, dif), noise)

    return run


def _heun(steps: int, churn: float = 0.0) -> Sampler:
    def run(data: GaussianMixture, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return edm_heun_sample(ExactEDMDenoiser(data), noise, num_steps=steps, s_churn=churn, generator=g)

    return run


def _flow(steps: int, heun: bool) -> Sampler:
    def run(data: GaussianMixture, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        sampler = flow_heun_sample if heun else flow_euler_sample
        return sampler(ExactFlowVelocity(data), noise, num_steps=steps)

    return run


def _diffusers(kind: str, steps: int) -> Sampler:
    def run(data: GaussianMixture, noise: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
        scheduler = {
            "DDPMScheduler": lambda: DDPMScheduler(**cfg, clip_sample=False),
            "DDIMScheduler": lambda: DDIMScheduler(**cfg, clip_sample=False),
            "DPMSolverMultistepScheduler": lambda: DPMSolverMultistepScheduler(**cfg),
        }[kind]()
        model = ExactGaussianModel(data, GaussianDiffusion.from_schedule("linear"))
        return diffusers_sample(scheduler, model, noise, num_inference_steps=steps, generator=g)

    return run


def report_cases() -> list[SamplerCase]:
    """The sampler configurations of the report (and of the exact-denoiser tests)."""
    return [
        SamplerCase(f"DDPM ancestral, learned range ({DDPM_STEPS} respaced)", DDPM_STEPS, _ddpm),
        SamplerCase("DDIM eta=0 (ddim50)", 50, _ddim("ddim50", 0.0)),
        SamplerCase("DDIM eta=0 (250 respaced)", 250, _ddim(250, 0.0)),
        SamplerCase("DDIM eta=0, x0-prediction (250 respaced)", 250, _ddim(250, 0.0, "x0")),
        SamplerCase("DDIM eta=1 (250 respaced)", 250, _ddim(250, 1.0)),
        SamplerCase("DPM-Solver++(2M), v-prediction (logsnr20)", 20, _dpm("logsnr20")),
        SamplerCase("DPM-Solver++(2M), v-prediction (logsnr50)", 50, _dpm("logsnr50")),
        SamplerCase(f"EDM Heun, {EDM_STEPS_CIFAR10} steps", heun_evaluations(EDM_STEPS_CIFAR10), _heun(EDM_STEPS_CIFAR10)),
        SamplerCase(f"EDM Heun, {EDM_STEPS_FFHQ64} steps", heun_evaluations(EDM_STEPS_FFHQ64), _heun(EDM_STEPS_FFHQ64)),
        SamplerCase(
            f"EDM Heun, {EDM_STEPS_FFHQ64} steps, S_churn=10",
            heun_evaluations(EDM_STEPS_FFHQ64),
            _heun(EDM_STEPS_FFHQ64, churn=10.0),
        ),
        SamplerCase("Flow Euler, 50 steps", 50, _flow(50, heun=False)),
        SamplerCase("Flow Euler, 250 steps", 250, _flow(250, heun=False)),
        SamplerCase("Flow Heun, 25 steps", 50, _flow(25, heun=True)),
        SamplerCase("diffusers DDPMScheduler, 250 steps", 250, _diffusers("DDPMScheduler", 250)),
        SamplerCase("diffusers DDIMScheduler, 100 steps", 100, _diffusers("DDIMScheduler", 100)),
        SamplerCase("diffusers DPMSolverMultistepScheduler, 25 steps", 25, _diffusers("DPMSolverMultistepScheduler", 25)),
    ]


def run_case(
    case: SamplerCase, data: GaussianMixture, num_samples: int = REPORT_NUM_SAMPLES, seed: int = 0
) -> tuple[torch.Tensor, SampleErrors]:
    """Run one case from seeded noise and a seeded generator; return samples and their errors."""
    noise = seeded_noise(num_samples, data.dim, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    samples = case.run(data, noise, generator)
    return samples, sample_errors(samples, data)


def exact_denoiser_report(num_samples: int = REPORT_NUM_SAMPLES, seed: int = 0) -> str:
    """Run every case on both data sets and return the markdown table of the docs."""
    gauss, mix = correlated_gaussian(), two_point_mixture()
    floor_g = sample_errors(gauss.sample(num_samples, torch.Generator().manual_seed(seed)), gauss)
    floor_m = sample_errors(mix.sample(num_samples, torch.Generator().manual_seed(seed)), mix)
    lines = [
        "| Sampler | Evaluations | Gaussian mean err | Gaussian cov rel err | Mixture mode-weight err | Mixture spread rel err |",
        "|---|---:|---:|---:|---:|---:|",
        f"| *exact data samples (floor)* | - | {floor_g.mean_error:.4f} | {floor_g.cov_rel_error:.4f} "
        f"| {floor_m.mode_weight_error:.4f} | {floor_m.spread_rel_error:.4f} |",
    ]
    for case in report_cases():
        _, eg = run_case(case, gauss, num_samples, seed)
        _, em = run_case(case, mix, num_samples, seed)
        lines.append(
            f"| {case.name} | {case.evaluations} | {eg.mean_error:.4f} | {eg.cov_rel_error:.4f} "
            f"| {em.mode_weight_error:.4f} | {em.spread_rel_error:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the report table (single-threaded: the analytic models work on tiny tensors)."""
    torch.set_num_threads(1)
    print(exact_denoiser_report())


if __name__ == "__main__":
    main()
