"""A recipe's diffusion process as two calls: the training loss and the sampler.

The trainer and ``diffit-toolkit sample`` talk only to :class:`Process`; the formulas live in
:mod:`diffit_toolkit.diffusion` and :mod:`diffit_toolkit.sampling`. A model is any callable
``model(x, t, y)`` (``t``: the Gaussian process's original step index, EDM's ``c_noise``, or
the flow time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from diffit_toolkit.diffusion import (
    EDMDenoiser,
    EDMLoss,
    EDMPrecond,
    GaussianDiffusion,
    LinearFlow,
    VELoss,
    VEPrecond,
    VPLoss,
    VPPrecond,
    create_gaussian_diffusion,
)
from diffit_toolkit.recipe import DiffusionSection, SampleSection
from diffit_toolkit.sampling import (
    ClassifierFreeGuidance,
    GuidanceConfig,
    ddim_sample,
    ddpm_sample,
    diffusers_sample,
    dpm_solver_pp_2m_sample,
    edm_heun_sample,
    flow_euler_sample,
    flow_heun_sample,
)

Model = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

_MEAN_TYPES = {"eps": "epsilon", "x0": "x0", "v": "v"}
_EDM = {"edm": (EDMPrecond, EDMLoss), "vp": (VPPrecond, VPLoss), "ve": (VEPrecond, VELoss)}


@dataclass
class Process:
    """The loss and the sampler of one diffusion process (built by :func:`build_process`)."""

    config: DiffusionSection

    def __post_init__(self) -> None:
        cfg = self.config
        if cfg.process == "gaussian":
            self.gaussian: GaussianDiffusion = create_gaussian_diffusion(
                noise_schedule=cfg.schedule,
                num_timesteps=cfg.num_timesteps,
                model_mean_type=_MEAN_TYPES[cfg.prediction],
                learn_sigma=cfg.learn_sigma,
            )
        elif cfg.process == "edm":
            precond_cls, loss_cls = _EDM[cfg.precond]
            self.precond = precond_cls(sigma_data=cfg.sigma_data) if cfg.precond == "edm" else precond_cls()
            self.edm_loss = loss_cls(sigma_data=cfg.sigma_data) if cfg.precond == "edm" else loss_cls()
        else:
            self.flow = LinearFlow()

    # -- training ------------------------------------------------------------------------------
    def loss(self, model: Model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-sample training loss ``(B,)`` with all randomness drawn from ``generator``."""
        process = self.config.process
        if process == "gaussian":
            t = self.gaussian.sample_timesteps(x0.shape[0], generator, x0.device)
            return self.gaussian.training_losses(model, x0, t, y, generator=generator)["loss"]
        if process == "edm":
            return self.edm_loss(EDMDenoiser(model, self.precond), x0, y, generator=generator)
        return self.flow.training_loss(model, x0, y, generator=generator)

    # -- sampling ------------------------------------------------------------------------------
    def guided(self, model: Model, sample: SampleSection, null_class: int | None) -> Model:
        """``model`` with classifier-free guidance when the scale is not 1 and labels exist."""
        if sample.guidance_scale == 1.0 or null_class is None:
            return model
        interval = None
        if sample.guidance_interval is not None and self.config.process == "gaussian":
            lo, hi = sample.guidance_interval
            interval = (lo * self.config.num_timesteps, hi * self.config.num_timesteps)
        elif sample.guidance_interval is not None and self.config.process == "edm":
            # fractions of the Heun sampler's rho-warped noise range (0: sigma_min, 1: sigma_max),
            # as the model sees them (c_noise grows with sigma in every preconditioning)
            interval = tuple(float(self.precond.c_noise(_karras_sigma(f))) for f in sample.guidance_interval)
        config = GuidanceConfig(
            scale=sample.guidance_scale,
            schedule=sample.guidance_schedule,
            power=sample.guidance_power,
            num_timesteps=self.config.num_timesteps,
            interval=interval,
            guided_channels=sample.guided_channels,
        )
        return ClassifierFreeGuidance(model, config, null_class=null_class)

    def sample(
        self,
        model: Model,
        noise: Tensor,
        y: Tensor | None,
        sample: SampleSection,
        generator: torch.Generator,
        null_class: int | None = None,
    ) -> Tensor:
        """Draw ``x_0`` from ``noise`` (B, C, H, W) with the recipe's sampler and guidance."""
        guided = self.guided(model, sample, null_class if y is not None else None)
        process, name = self.config.process, sample.sampler
        if process == "gaussian":
            if name.startswith("diffusers:"):
                return diffusers_sample(
                    _diffusers_scheduler(name.split(":", 1)[1], self.config), guided, noise, y,
                    num_inference_steps=sample.steps, generator=generator,
                )
            # DPM-Solver++ needs steps evenly spaced in log-SNR to be accurate at 10-25 steps
            # (docs/diffusion.md); the other samplers use ADM's even respacing.
            respaced = self.gaussian.respace(f"logsnr{sample.steps}" if name == "dpm_solver++" else sample.steps)
            clip = sample.clip_denoised
            if name == "ddpm":
                return ddpm_sample(respaced, guided, noise, y, generator=generator, clip_denoised=clip)
            if name == "ddim":
                return ddim_sample(respaced, guided, noise, y, eta=sample.eta, generator=generator, clip_denoised=clip)
            return dpm_solver_pp_2m_sample(respaced, guided, noise, y, clip_denoised=clip)
        if process == "edm":
            return edm_heun_sample(EDMDenoiser(guided, self.precond), noise, y, num_steps=sample.steps, generator=generator)
        sampler = flow_euler_sample if name == "euler" else flow_heun_sample
        return sampler(guided, noise, y, num_steps=sample.steps)


def _diffusers_scheduler(class_name: str, config: DiffusionSection) -> Any:
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ValueError(f"sampler 'diffusers:{class_name}': diffusers has no scheduler of that name (e.g. diffusers:DPMSolverMultistepScheduler)")
    schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[config.schedule]
    prediction = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[config.prediction]
    return cls(num_train_timesteps=config.num_timesteps, beta_schedule=schedule, prediction_type=prediction)


def _karras_sigma(fraction: float) -> torch.Tensor:
    """The noise level at ``fraction`` of EDM's rho-warped range (eq. 5): 0 -> sigma_min, 1 -> sigma_max."""
    from diffit_toolkit.diffusion.edm import RHO, SIGMA_MAX, SIGMA_MIN

    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return torch.tensor((lo + fraction * (hi - lo)) ** RHO, dtype=torch.float64)


def build_process(config: DiffusionSection) -> Process:
    """The process of a recipe's ``diffusion`` section."""
    return Process(config)
