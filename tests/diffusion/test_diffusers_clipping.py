"""The ``diffusers:<Scheduler>`` sampler follows the recipe: clipping on and off, learned variance.

Driven by the analytic optimal model of a mixture whose modes lie outside [-1, 1] (so clipping
changes the samples), a diffusers scheduler built by the process plugin gives the toolkit's own
sampler's samples on the same timesteps: DDIM, DPM-Solver++(2M) and ancestral DDPM with a
learned-range variance (same noise draws from the same generator).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffit_plugins.processes import GaussianProcess, _diffusers_scheduler, gaussian_diffusers
from diffit_toolkit.diffusion import ExactGaussianModel
from diffit_toolkit.diffusion.exact import GaussianMixture
from diffit_toolkit.sampling import ddim_sample, ddpm_sample, dpm_solver_pp_2m_sample
from diffit_toolkit.sampling.exact_report import seeded_noise

# float32 schedule in diffusers vs float64 in the toolkit: agreement to ~1e-5.
ATOL = 2e-4


def _data() -> GaussianMixture:
    return GaussianMixture.two_point(torch.tensor([1.6, -1.2, 0.9]), spread=0.2, weight=0.4)


def _process(learn_sigma: bool = False) -> GaussianProcess:
    cfg = SimpleNamespace(schedule="linear", num_timesteps=1000, prediction="eps", learn_sigma=learn_sigma)
    return GaussianProcess(cfg)


def _settings(sampler: str, steps: int, clip: bool) -> SimpleNamespace:
    return SimpleNamespace(sampler=f"diffusers:{sampler}", steps=steps, clip_denoised=clip)


@pytest.mark.parametrize("clip", [False, True])
def test_diffusers_ddim_equals_toolkit_ddim(clip: bool) -> None:
    proc, noise = _process(), seeded_noise(512, 3, 0)
    model = ExactGaussianModel(_data(), proc.gaussian)
    ours = ddim_sample(proc.gaussian.respace("ddim25"), model, noise, clip_denoised=clip)
    theirs = gaussian_diffusers(proc, model, noise, None, _settings("DDIMScheduler", 25, clip), None)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    if clip:
        unclipped = ddim_sample(proc.gaussian.respace("ddim25"), model, noise)
        assert (unclipped - ours).abs().max() > 0.05  # clipping matters for this data
        assert ours.abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("clip", [False, True])
def test_diffusers_dpm_solver_equals_toolkit_dpm_solver(clip: bool) -> None:
    proc, noise = _process(), seeded_noise(512, 3, 1)
    model = ExactGaussianModel(_data(), proc.gaussian)
    scheduler = _diffusers_scheduler("DPMSolverMultistepScheduler", proc.config, clip)
    scheduler.set_timesteps(20)
    ours = dpm_solver_pp_2m_sample(proc.gaussian.respace_to(scheduler.timesteps.tolist()), model, noise, clip_denoised=clip)
    theirs = gaussian_diffusers(proc, model, noise, None, _settings("DPMSolverMultistepScheduler", 20, clip), None)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    if clip:
        assert (dpm_solver_pp_2m_sample(proc.gaussian.respace_to(scheduler.timesteps.tolist()), model, noise)
                - ours).abs().max() > 0.05


@pytest.mark.parametrize("clip", [False, True])
def test_diffusers_ddpm_learned_range_equals_toolkit_ddpm(clip: bool) -> None:
    proc, noise = _process(learn_sigma=True), seeded_noise(256, 3, 2)
    model = ExactGaussianModel(_data(), proc.gaussian)  # eps and the optimal learned-range variance (2C channels)
    scheduler = _diffusers_scheduler("DDPMScheduler", proc.config, clip)
    assert scheduler.config.variance_type == "learned_range"
    scheduler.set_timesteps(50)
    respaced = proc.gaussian.respace_to(scheduler.timesteps.tolist())
    ours = ddpm_sample(respaced, model, noise, generator=torch.Generator().manual_seed(7), clip_denoised=clip)
    theirs = gaussian_diffusers(proc, model, noise, None, _settings("DDPMScheduler", 50, clip), torch.Generator().manual_seed(7))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    fixed = _diffusers_scheduler("DDPMScheduler", _process().config, clip)
    assert fixed.config.variance_type == "fixed_small"


def test_recipe_clip_setting_reaches_the_scheduler() -> None:
    cfg = _process().config
    assert _diffusers_scheduler("DDIMScheduler", cfg, False).config.clip_sample is False
    assert _diffusers_scheduler("DDIMScheduler", cfg, True).config.clip_sample is True
    assert _diffusers_scheduler("DDPMScheduler", cfg, False).config.thresholding is False
    dpm = _diffusers_scheduler("DPMSolverMultistepScheduler", cfg, True).config
    assert dpm.thresholding is True and dpm.sample_max_value == 1.0
    assert _diffusers_scheduler("DPMSolverMultistepScheduler", cfg, False).config.thresholding is False


def test_scheduler_without_clipping_refuses_clip_denoised() -> None:
    with pytest.raises(ValueError, match="cannot clip"):
        _diffusers_scheduler("EulerDiscreteScheduler", _process().config, True)
    assert _diffusers_scheduler("EulerDiscreteScheduler", _process().config, False) is not None
