"""The process and sampler kits over every registered one, and proof that they fail broken ones."""

from __future__ import annotations

import unittest

import pytest
import torch

from diffit_toolkit.registry import processes
from diffit_toolkit.sampling import flow_euler_sample
from diffit_toolkit.testing import (
    PROCESS_PROPERTIES,
    SAMPLER_PROPERTIES,
    ConformanceError,
    check_process,
    check_sampler,
    process_checks,
    sampler_checks,
)

# process_check / sampler_check: one test per registered process (sampler) and property.
pytest_plugins = ["diffit_toolkit.testing"]


def test_every_registered_process_has_every_property(process_check):
    process_check()


def test_every_registered_sampler_has_every_property(sampler_check):
    sampler_check()


@pytest.mark.parametrize(
    ("process", "options"),
    [("gaussian", {"prediction": "x0", "learn_sigma": False}), ("gaussian", {"prediction": "v", "learn_sigma": False}),
     ("gaussian", {"schedule": "cosine"}), ("edm", {"precond": "vp"}), ("edm", {"precond": "ve"})],
    ids=str,
)
def test_every_prediction_and_preconditioning_passes(process, options):
    assert check_process(process, options=options).passed == tuple(PROCESS_PROPERTIES)


def test_a_sampler_passes_with_other_settings_and_process_options():
    report = check_sampler("gaussian.ddim", process_options={"prediction": "v", "learn_sigma": False},
                           settings={"steps": 250})
    assert report.subject == "sampler 'gaussian.ddim'" and report.passed == tuple(SAMPLER_PROPERTIES)


def test_checks_have_test_ids():
    assert [str(c) for c in process_checks("flow")] == [f"flow-{p.slug}" for p in PROCESS_PROPERTIES.values()]
    assert str(sampler_checks("gaussian.ddim")[2]) == "gaussian.ddim-recovers_a_point_mass"


# -- broken processes ------------------------------------------------------------------------

Flow = processes.get("flow")


class GlobalNoise(Flow):
    """Draws its noise from the global random state, not the generator."""

    def loss(self, model, x0, y, generator):
        t = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
        return self.flow.training_loss(model, x0, y, t=t, noise=torch.randn_like(x0))


class MeanLoss(Flow):
    """Returns the batch mean instead of one loss per sample."""

    def loss(self, model, x0, y, generator):
        return super().loss(model, x0, y, generator).mean()


class ShiftsData(Flow):
    """Trains on the data shifted by 0.5 (a normalisation its exact model does not know)."""

    def loss(self, model, x0, y, generator):
        return super().loss(model, x0 + 0.5, y, generator)


class LevelOutOfRange(Flow):
    """Maps the flow time to [-1, 1] instead of [0, 1]."""

    def noise_level(self, t):
        return 1 - 2 * t.to(torch.float64)


class NoExactModel(Flow):
    def exact_model(self, data):
        raise NotImplementedError


@pytest.mark.parametrize(
    ("cls", "prop", "detail"),
    [
        (GlobalNoise, "loss deterministic under a seed", "randomness drawn outside the generator"),
        (MeanLoss, "loss shape and dtype", "loss has shape () for a batch of 4"),
        (ShiftsData, "exact model has the lowest loss", "that of the exact model of data with a shifted mean"),
        (LevelOutOfRange, "noise level range", "outside [0, 1]"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_the_kit_fails_a_broken_process_in_one_line(cls, prop, detail):
    with pytest.raises(ConformanceError) as info:
        check_process(cls)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"diffusion process '{cls.__name__}': {prop} failed: ")
    assert detail in message
    failed = []
    for check in process_checks(cls):  # one check per property: only the broken one fails
        try:
            check()
        except ConformanceError:
            failed.append(check.property)
    assert failed == [prop]


def test_a_process_without_an_exact_model_is_skipped():
    with pytest.raises(unittest.SkipTest, match="defines no exact_model"):
        check_process(NoExactModel)


# -- broken samplers -------------------------------------------------------------------------


def churn_from_global_state(process, model, noise, y, settings, generator):
    x = flow_euler_sample(model, noise, y, num_steps=settings.steps)
    return x + 1e-3 * torch.randn_like(x)


def stops_early(process, model, noise, y, settings, generator):
    """Integrates the flow only to t = 0.9."""
    x, times = noise, torch.linspace(0, 0.9, settings.steps + 1, dtype=noise.dtype)
    for i in range(settings.steps):
        x = x + (times[i + 1] - times[i]) * model(x, times[i].expand(x.shape[0]), y)
    return x


def ddpm_without_noise(process, model, noise, y, settings, generator):
    """DDPM's means without the ancestral noise: lands on the data's mean, too narrow."""
    dif = process.gaussian.respace(settings.steps)
    x = noise
    for i in reversed(range(dif.num_timesteps)):
        x = dif.p_mean_variance(model, x, torch.full((x.shape[0],), i), y, False)["mean"]
    return x


def float32_only(process, model, noise, y, settings, generator):
    return flow_euler_sample(model, noise.float(), y, num_steps=settings.steps)


@pytest.mark.parametrize(
    ("fn", "process", "prop", "detail"),
    [
        (churn_from_global_state, "flow", "deterministic under a seed", "randomness drawn outside the generator"),
        (stops_early, "flow", "recovers a point mass", "samples land up to"),
        (ddpm_without_noise, "gaussian", "recovers a Gaussian", "times its variance"),
        (float32_only, "flow", "output shape and dtype", "returned torch.float32 for torch.float64 noise"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_the_kit_fails_a_broken_sampler_in_one_line(fn, process, prop, detail):
    with pytest.raises(ConformanceError) as info:
        check_sampler(fn, process=process)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"sampler '{fn.__name__}': {prop} failed: ")
    assert detail in message
