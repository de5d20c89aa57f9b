"""Drive a toolkit model with any diffusers scheduler (``set_timesteps``, ``scale_model_input``, ``step``).

The scheduler must be configured for the model's training: ``num_train_timesteps``,
``beta_schedule`` and ``prediction_type`` as the model was trained (DiT: 1000, ``"linear"``,
``"epsilon"``), and ``clip_sample=False`` for latent models. Build schedulers from config
arguments, e.g. ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
clip_sample=False)``; nothing is downloaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from diffit_toolkit.diffusion.gaussian import LEARNED_VAR_TYPES, Model


def _scheduler_learns_variance(scheduler: Any) -> bool:
    return getattr(scheduler.config, "variance_type", None) in LEARNED_VAR_TYPES


@torch.no_grad()
def diffusers_sample(
    scheduler: Any,
    model: Model,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Sample with a diffusers scheduler and a toolkit model ``model(x, t, y)``.

    The model receives the scheduler's timesteps (original training indices for the DDPM
    family) broadcast to ``(B,)``. A learned-variance output (``2C`` channels) is cut to its
    first ``C`` channels unless the scheduler's ``variance_type`` is ``learned`` /
    ``learned_range``, in which case the scheduler gets all ``2C``.

    Args:
        scheduler: A diffusers scheduler instance (``DDPMScheduler``, ``DDIMScheduler``,
            ``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ...).
        model: The toolkit model.
        noise: ``(B, C, ...)`` standard normal noise (scaled by ``init_noise_sigma`` here).
        y: Labels.
        num_inference_steps: Steps (one evaluation each for these schedulers).
        generator: Randomness of stochastic schedulers (passed to ``step`` when it accepts one).
        step_kwargs: Extra arguments of ``scheduler.step`` (e.g. ``{"eta": 1.0}`` for DDIM).

    Returns:
        ``(B, C, ...)`` samples.

    Raises:
        ValueError: if ``step_kwargs`` names an argument ``scheduler.step`` does not take.
    """
    step_params = inspect.signature(scheduler.step).parameters
    extra = dict(step_kwargs or {})
    unknown = sorted(k for k in extra if k not in step_params)
    if unknown:
        raise ValueError(
            f"{type(scheduler).__name__}.step does not take {unknown}; valid arguments are "
            f"{', '.join(step_params)}."
        )
    if "generator" in step_params:
        extra["generator"] = generator
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    channels = noise.shape[1]
    keep_variance = _scheduler_learns_variance(scheduler)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = model(x_in, t.expand(x.shape[0]).to(x.device), y)  # t: (B,)
        if out.shape[1] == 2 * channels and not keep_variance:
            out = out[:, :channels]
        x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
    return x
