"""Diffusion processes: ADM/DiT Gaussian diffusion, EDM preconditioning and losses, flow matching.

A model is any callable ``model(x, t, y) -> output``; see each process for what ``t`` means.
"""

from diffit_toolkit.diffusion.edm import (
    EDM_STEPS_CIFAR10,
    EDM_STEPS_FFHQ64,
    EDMDenoiser,
    EDMLoss,
    EDMPrecond,
    VELoss,
    VEPrecond,
    VPLoss,
    VPPrecond,
    heun_evaluations,
    karras_sigmas,
)
from diffit_toolkit.diffusion.exact import (
    ExactEDMDenoiser,
    ExactEDMRawNetwork,
    ExactFlowVelocity,
    ExactGaussianModel,
    GaussianMixture,
    SampleErrors,
    sample_errors,
)
from diffit_toolkit.diffusion.flow import LinearFlow
from diffit_toolkit.diffusion.gaussian import GaussianDiffusion, create_gaussian_diffusion, mean_flat, min_snr_weight
from diffit_toolkit.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from diffit_toolkit.diffusion.schedules import (
    BETA_SCHEDULES,
    NUM_TRAIN_TIMESTEPS,
    get_named_beta_schedule,
    space_timesteps,
)

__all__ = [
    "BETA_SCHEDULES",
    "EDM_STEPS_CIFAR10",
    "EDM_STEPS_FFHQ64",
    "NUM_TRAIN_TIMESTEPS",
    "EDMDenoiser",
    "EDMLoss",
    "EDMPrecond",
    "ExactEDMDenoiser",
    "ExactEDMRawNetwork",
    "ExactFlowVelocity",
    "ExactGaussianModel",
    "GaussianDiffusion",
    "GaussianMixture",
    "LinearFlow",
    "SampleErrors",
    "VELoss",
    "VEPrecond",
    "VPLoss",
    "VPPrecond",
    "create_gaussian_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "heun_evaluations",
    "karras_sigmas",
    "mean_flat",
    "min_snr_weight",
    "normal_kl",
    "sample_errors",
    "space_timesteps",
]
