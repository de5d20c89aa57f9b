"""Built-in diffusion processes (Gaussian ADM/DiT, EDM, linear flow) and their samplers.

Each process is a [`Process`][diffit_toolkit.process.Process]; each sampler a function registered
as ``"<process>.<name>"`` and called as ``sampler(process, model, noise, y, settings, generator)``
with an already guided model.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffit_toolkit.diffusion import (
    EDMDenoiser,
    EDMLoss,
    EDMPrecond,
    ExactEDMRawNetwork,
    ExactFlowVelocity,
    ExactGaussianModel,
    GaussianDiffusion,
    GaussianMixture,
    LinearFlow,
    VELoss,
    VEPrecond,
    VPLoss,
    VPPrecond,
    create_gaussian_diffusion,
    min_snr_weight,
)
from diffit_toolkit.diffusion.edm import RHO, sampling_sigma_range
from diffit_toolkit.hookspecs import hookimpl
from diffit_toolkit.process import Process
from diffit_toolkit.recipe import ProcessOptions
from diffit_toolkit.sampling import (
    ddim_sample,
    ddpm_sample,
    diffusers_sample,
    dpm_solver_pp_2m_sample,
    edm_heun_sample,
    flow_euler_sample,
    flow_heun_sample,
)

_MEAN_TYPES = {"eps": "epsilon", "x0": "x0", "v": "v"}
_EDM = {"edm": (EDMPrecond, EDMLoss), "vp": (VPPrecond, VPLoss), "ve": (VEPrecond, VELoss)}


class GaussianOptions(ProcessOptions):
    """Options of the ``gaussian`` process (``diffusion.<key>``).

    Attributes:
        schedule: beta schedule, ``linear`` or ``cosine``.
        num_timesteps: training steps (1000).
        prediction: model output, ``eps``, ``x0`` or ``v``.
        learn_sigma: learned-range variance with the hybrid MSE + VLB loss (the model then
            outputs 2C channels); needs ``prediction: eps``.
        min_snr_gamma: weight each step's loss by Min-SNR-gamma (Hang et al., 2023), the x0
            error weighted by ``min(SNR, gamma)``; ``null``: unweighted (5 is the paper's value).
    """

    schedule: Literal["linear", "cosine"] = "linear"
    num_timesteps: int = Field(1000, gt=0, le=100_000)
    prediction: Literal["eps", "x0", "v"] = "eps"
    learn_sigma: bool = True
    min_snr_gamma: float | None = Field(None, gt=0, le=1e6)

    @model_validator(mode="after")
    def _learned_variance_needs_eps(self) -> GaussianOptions:
        if self.learn_sigma and self.prediction != "eps":
            raise ValueError("at diffusion.learn_sigma: the learned variance is trained with epsilon prediction; "
                             "set diffusion.prediction: eps or diffusion.learn_sigma: false")
        return self


class EDMOptions(ProcessOptions):
    """Options of the ``edm`` process (``diffusion.<key>``).

    Attributes:
        precond: preconditioning, ``edm``, ``vp`` or ``ve``.
        sigma_data: data standard deviation (``precond: edm``).
    """

    precond: Literal["edm", "vp", "ve"] = "edm"
    sigma_data: float = Field(0.5, gt=0, le=1e6)


class GaussianProcess(Process):
    """ADM/DiT Gaussian diffusion: linear or cosine betas, eps/x0/v prediction, optional learned
    variance with the hybrid loss; the model's ``t`` is the training step index 0..T-1."""

    Options = GaussianOptions

    def __init__(self, config: GaussianOptions) -> None:
        super().__init__(config)
        self.gaussian: GaussianDiffusion = create_gaussian_diffusion(
            noise_schedule=config.schedule,
            num_timesteps=config.num_timesteps,
            model_mean_type=_MEAN_TYPES[config.prediction],
            learn_sigma=config.learn_sigma,
        )
        gamma = getattr(config, "min_snr_gamma", None)  # configs built by hand may lack it
        self.min_snr = None if gamma is None else min_snr_weight(
            self.gaussian.alphas_cumprod, gamma, _MEAN_TYPES[config.prediction])

    def loss(self, model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        t = self.gaussian.sample_timesteps(x0.shape[0], generator, x0.device)
        terms = self.gaussian.training_losses(model, x0, t, y, generator=generator)
        if self.min_snr is None:
            return terms["loss"]
        if self.min_snr.device != x0.device:  # moved once, not every step
            self.min_snr = self.min_snr.to(x0.device)
        weight = self.min_snr[t].to(terms["mse"].dtype)
        return weight * terms["mse"] + terms.get("vb", 0.0)

    def exact_model(self, data: GaussianMixture):
        """The posterior mean as the model predicts it (epsilon, x0 or v) and, when the model
        learns a variance, the one that is optimal on the training steps."""
        return ExactGaussianModel(data, self.gaussian)

    def noise_level(self, t: Tensor) -> Tensor:
        return t.to(torch.float64) / self.config.num_timesteps

    def diffusers_scheduler(self, class_name: str, clip_denoised: bool = False) -> Any:
        """The diffusers scheduler ``class_name`` for this process's training schedule, configured
        as the ``diffusers:<SchedulerClass>`` sampler uses it (what an exported pipeline gets)."""
        return _diffusers_scheduler(class_name, self.config, clip_denoised)


class EDMProcess(Process):
    """EDM (Karras et al. 2022) with EDM, VP or VE preconditioning; the model's ``t`` is
    ``c_noise(sigma)``. Noise level: the position of sigma on the sampler's rho-warped range
    from ``sigma_max`` (1) to ``sigma_min`` (0), so a fraction of the level is about that
    fraction of the sampling steps."""

    Options = EDMOptions

    def __init__(self, config: EDMOptions) -> None:
        super().__init__(config)
        precond_cls, loss_cls = _EDM[config.precond]
        edm = config.precond == "edm"
        self.precond = precond_cls(sigma_data=config.sigma_data) if edm else precond_cls()
        self.edm_loss = loss_cls(sigma_data=config.sigma_data) if edm else loss_cls()

    def loss(self, model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        return self.edm_loss(EDMDenoiser(model, self.precond), x0, y, generator=generator)

    def exact_model(self, data: GaussianMixture):
        """The raw network that the preconditioning turns into the optimal denoiser."""
        return ExactEDMRawNetwork(data, self.precond)

    def noise_level(self, t: Tensor) -> Tensor:
        sigma = self.precond.sigma_from_c_noise(t.to(torch.float64))
        sigma_min, sigma_max = sampling_sigma_range(self.precond)
        lo, hi = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
        return ((sigma ** (1 / RHO) - lo) / (hi - lo)).clamp(0, 1)


class FlowProcess(Process):
    """Flow matching with the linear interpolant and velocity prediction (SiT); the model's ``t``
    runs from 0 (noise) to 1 (data), so the noise level is ``1 - t``; it has no options."""

    def __init__(self, config: ProcessOptions) -> None:
        super().__init__(config)
        self.flow = LinearFlow()

    def loss(self, model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        return self.flow.training_loss(model, x0, y, generator=generator)

    def exact_model(self, data: GaussianMixture):
        """The optimal velocity ``E[x_data - noise | x_t]``."""
        return ExactFlowVelocity(data)

    def noise_level(self, t: Tensor) -> Tensor:
        return 1 - t.to(torch.float64)


# -- samplers -----------------------------------------------------------------------------------


def gaussian_ddpm(process: GaussianProcess, model, noise, y, settings, generator) -> Tensor:
    """Ancestral DDPM sampling on ADM's evenly respaced steps."""
    respaced = process.gaussian.respace(settings.steps)
    return ddpm_sample(respaced, model, noise, y, generator=generator, clip_denoised=settings.clip_denoised)


def gaussian_ddim(process: GaussianProcess, model, noise, y, settings, generator) -> Tensor:
    """DDIM (``sample.eta`` for stochasticity) on ADM's evenly respaced steps."""
    respaced = process.gaussian.respace(settings.steps)
    return ddim_sample(respaced, model, noise, y, eta=settings.eta, generator=generator, clip_denoised=settings.clip_denoised)


def gaussian_dpm_solver(process: GaussianProcess, model, noise, y, settings, generator) -> Tensor:
    """DPM-Solver++(2M) on steps evenly spaced in log-SNR (accurate at 10-25 steps)."""
    respaced = process.gaussian.respace(f"logsnr{settings.steps}")
    return dpm_solver_pp_2m_sample(respaced, model, noise, y, clip_denoised=settings.clip_denoised)


def gaussian_diffusers(process: GaussianProcess, model, noise, y, settings, generator) -> Tensor:
    """Any diffusers scheduler, named as ``diffusers:<SchedulerClass>``, built for the training
    schedule with the recipe's ``clip_denoised``; DDIM's ``step`` gets the recipe's ``eta`` and,
    when clipping, ``use_clipped_model_output``."""
    import inspect

    scheduler = _diffusers_scheduler(settings.sampler.split(":", 1)[1], process.config, settings.clip_denoised)
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "eta" in step_params:  # DDIM: the recipe's sample.eta
        step_kwargs["eta"] = float(getattr(settings, "eta", 0.0))
    if settings.clip_denoised and "use_clipped_model_output" in step_params:
        step_kwargs["use_clipped_model_output"] = True  # eps re-derived from the clipped x_0, as ADM's DDIM
    return diffusers_sample(scheduler, model, noise, y, num_inference_steps=settings.steps, generator=generator,
                            step_kwargs=step_kwargs)


def _diffusers_scheduler(class_name: str, config: Any, clip_denoised: bool = False) -> Any:
    """The diffusers scheduler ``class_name`` configured like the toolkit's own samplers.

    The training schedule (``num_train_timesteps``, ``beta_schedule``, ``prediction_type``) is
    always set. ``clip_denoised`` becomes ``clip_sample`` (range 1, ``thresholding`` off) on
    schedulers that have it (DDPM, DDIM, ...); on schedulers with only ``thresholding``
    (DPM-Solver, UniPC, ...) it becomes dynamic thresholding with ``sample_max_value=1``, which
    is exactly clipping the x_0 estimate to [-1, 1]. A model with a learned variance gets
    ``variance_type="learned_range"`` where the scheduler takes one (DDPM uses it, DPM-Solver
    drops the variance channels).
    """
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ValueError(f"sampler 'diffusers:{class_name}': diffusers has no scheduler of that name (e.g. diffusers:DPMSolverMultistepScheduler)")
    params = inspect.signature(cls.__init__).parameters
    schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[config.schedule]
    prediction = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[config.prediction]
    options: dict[str, Any] = dict(num_train_timesteps=config.num_timesteps, beta_schedule=schedule, prediction_type=prediction)
    if "clip_sample" in params:
        options.update(clip_sample=clip_denoised, clip_sample_range=1.0)
        if "thresholding" in params:
            options["thresholding"] = False
    elif "thresholding" in params:
        options["thresholding"] = clip_denoised
        if clip_denoised:
            options["sample_max_value"] = 1.0  # threshold s clamped to [1, 1]: plain clipping
    elif clip_denoised:
        raise ValueError(f"sampler 'diffusers:{class_name}' cannot clip its x_0 estimate (no clip_sample or "
                         f"thresholding option); set sample.clip_denoised: false or choose another scheduler")
    if config.learn_sigma and "variance_type" in params:
        options["variance_type"] = "learned_range"
    return cls(**{k: v for k, v in options.items() if k in params})


def edm_heun(process: EDMProcess, model, noise, y, settings, generator) -> Tensor:
    """EDM's Heun sampler (Algorithm 2) on the rho-warped sigma schedule, its range clamped to
    the preconditioning's trained range (VP / VE) as NVlabs/edm does."""
    lo, hi = sampling_sigma_range(process.precond)
    return edm_heun_sample(EDMDenoiser(model, process.precond), noise, y, num_steps=settings.steps,
                           sigma_min=lo, sigma_max=hi, generator=generator)


def flow_euler(process: FlowProcess, model, noise, y, settings, generator) -> Tensor:
    """Euler integration of the flow ODE from t = 0 to 1."""
    return flow_euler_sample(model, noise, y, num_steps=settings.steps)


def flow_heun(process: FlowProcess, model, noise, y, settings, generator) -> Tensor:
    """Heun (2nd-order) integration of the flow ODE from t = 0 to 1."""
    return flow_heun_sample(model, noise, y, num_steps=settings.steps)


@hookimpl
def diffit_register(registrar):
    registrar.add("process", "gaussian", GaussianProcess)
    registrar.add("process", "edm", EDMProcess)
    registrar.add("process", "flow", FlowProcess)
    for name, fn in (("gaussian.ddpm", gaussian_ddpm), ("gaussian.ddim", gaussian_ddim),
                     ("gaussian.dpm_solver++", gaussian_dpm_solver), ("gaussian.diffusers", gaussian_diffusers),
                     ("edm.heun", edm_heun), ("flow.euler", flow_euler), ("flow.heun", flow_heun)):
        registrar.add("sampler", name, fn)
