"""Samplers (DDPM, DDIM, DPM-Solver++(2M), EDM Heun, flow Euler/Heun), guidance and the diffusers bridge.

Every sampler takes the model, the initial noise and, where it draws randomness, a
``torch.Generator``: the same seed gives the same samples on the same device.
"""

from diffit_toolkit.sampling.diffusers_bridge import diffusers_sample
from diffit_toolkit.sampling.edm_sampler import edm_heun_sample
from diffit_toolkit.sampling.flow_samplers import flow_euler_sample, flow_heun_sample
from diffit_toolkit.sampling.gaussian_samplers import ddim_sample, ddpm_sample, dpm_solver_pp_2m_sample
from diffit_toolkit.sampling.guidance import (
    DEFAULT_GUIDED_CHANNELS,
    GUIDANCE_SCHEDULES,
    ClassifierFreeGuidance,
    GuidanceConfig,
    power_cosine_scale,
)

__all__ = [
    "DEFAULT_GUIDED_CHANNELS",
    "GUIDANCE_SCHEDULES",
    "ClassifierFreeGuidance",
    "GuidanceConfig",
    "ddim_sample",
    "ddpm_sample",
    "diffusers_sample",
    "dpm_solver_pp_2m_sample",
    "edm_heun_sample",
    "flow_euler_sample",
    "flow_heun_sample",
    "power_cosine_scale",
]
