"""The conformance kit for diffusion processes and samplers: the exact-denoiser checks.

For Gaussian data the model a process trains towards is known in closed form: the posterior
mean ([`diffit_toolkit.diffusion.exact`][diffit_toolkit.diffusion.exact]), which each process
expresses in its own parametrisation through
[`Process.exact_model`][diffit_toolkit.process.Process.exact_model] (epsilon, x0 or v with the
learned variance, EDM's raw network behind its preconditioning, the flow velocity). Plugged into
the loss, that model must beat the exact models of other data; plugged into a sampler, it must
give back the data: samples of data that all equal one tensor land on it, samples of a Gaussian
have its mean and variance. The data are tiny (8 values per sample, as (2, 2, 2) tensors), so
each property takes well under a second.
"""

from __future__ import annotations

import importlib.util
import unittest
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffit_toolkit.diffusion.exact import GaussianMixture
from diffit_toolkit.process import DIFFUSERS_PREFIX, Model, Process, Sampler
from diffit_toolkit.recipe import ProcessOptions, SampleSection
from diffit_toolkit.registry import processes, samplers
from diffit_toolkit.testing.core import (
    ConformanceReport,
    Property,
    PropertyCheck,
    bind,
    expect,
    global_seeds,
    run_checks,
    run_property,
)

__all__ = [
    "DATA_SHAPE",
    "DIFFUSERS_SCHEDULER",
    "GAUSSIAN_STD",
    "PROCESS_PROPERTIES",
    "SAMPLER_PROPERTIES",
    "SAMPLER_STEPS",
    "ProcessTarget",
    "SamplerTarget",
    "check_process",
    "check_sampler",
    "process_checks",
    "sampler_checks",
]

#: Shape of one toy sample: 8 values as (C, H, W).
DATA_SHAPE = (2, 2, 2)
#: Standard deviation of the toy Gaussian data (per value, independent).
GAUSSIAN_STD = 0.5
#: Standard deviation of the "point mass" (every sample equals one tensor, up to this).
POINT_STD = 1e-3
#: Sampling steps of the sampler checks (``sample.steps``).
SAMPLER_STEPS = 100
#: The scheduler a ``<process>.diffusers`` sampler is checked with (``diffusers:<SchedulerClass>``).
DIFFUSERS_SCHEDULER = "DDIMScheduler"
#: Samples of the Gaussian check; its standard errors: mean 0.016, pooled variance 1.6 %.
GAUSSIAN_SAMPLES = 1000
#: Largest distance of a sample from the point mass.
POINT_TOLERANCE = 0.05
#: Largest error of a sample mean (per value) of the Gaussian.
MEAN_TOLERANCE = 0.1
#: Largest relative error of the samples' variance (pooled over the values) of the Gaussian.
VARIANCE_TOLERANCE = 0.1

_DIM = 8  # values per sample, prod(DATA_SHAPE)


def _center() -> Tensor:
    """The data's mean: (8,) values in [-0.8, 0.8], fixed."""
    return torch.rand(_DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.6 - 0.8


def _gaussian(shift: float = 0.0, std: float = GAUSSIAN_STD) -> GaussianMixture:
    return GaussianMixture.gaussian(_center() + shift, std**2 * torch.eye(_DIM, dtype=torch.float64))


def _batch(data: GaussianMixture, n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` samples of ``data`` as (n, 2, 2, 2)."""
    return data.sample(n, torch.Generator().manual_seed(seed)).reshape(n, *DATA_SHAPE).to(dtype)


def _noise(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, *DATA_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class ProcessTarget:
    """A diffusion process as the kit checks it.

    Attributes:
        name: registered name (or the class's ``__name__``).
        cls: the [`Process`][diffit_toolkit.process.Process] subclass.
        options: its recipe options (``diffusion.<key>``; the defaults otherwise).
    """

    name: str
    cls: type[Process]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"diffusion process '{self.name}'"

    def build(self) -> Process:
        options_cls = getattr(self.cls, "Options", ProcessOptions)
        return self.cls(options_cls.model_validate({**self.options, "process": self.name}))

    def exact(self, process: Process, data: GaussianMixture) -> Model:
        """The process's exact model of ``data``; ``unittest.SkipTest`` when it defines none."""
        try:
            return process.exact_model(data)
        except NotImplementedError:
            raise unittest.SkipTest(
                f"{self.subject} defines no exact_model(data), which the kit plugs into its loss and samplers"
            ) from None


@dataclass(frozen=True)
class SamplerTarget:
    """A sampler as the kit checks it.

    Attributes:
        name: registered name (``<process>.<sampler>``) or the function's ``__name__``.
        sampler: the sampler function.
        process: the process it samples.
        settings: the sample section it is called with.
    """

    name: str
    sampler: Sampler
    process: ProcessTarget
    settings: SampleSection

    @property
    def subject(self) -> str:
        return f"sampler '{self.name}'"

    def build(self) -> Process:
        if self.settings.sampler.startswith(f"{DIFFUSERS_PREFIX}:") and importlib.util.find_spec("diffusers") is None:
            raise unittest.SkipTest(f"{self.subject} needs diffusers, which is not installed")
        return self.process.build()

    def run(self, process: Process, model: Model, noise: Tensor, seed: int) -> Tensor:
        return self.sampler(process, model, noise, None, self.settings, _gen(seed))


class _Recording:
    """A model that records the ``(x, t)`` it is called with."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append((x.detach(), t.detach()))
        return self.model(x, t, y)


# -- the process properties, one function each ------------------------------------------------


def _loss_shape_and_dtype(t: ProcessTarget) -> None:
    process = t.build()
    data = _gaussian()
    for dtype in (torch.float32, torch.float64):
        x0 = _batch(data, 4, seed=1, dtype=dtype)
        model = _Recording(t.exact(process, data))
        loss = process.loss(model, x0, None, _gen(2))
        expect(isinstance(loss, Tensor), f"loss returned a {type(loss).__name__}, not a tensor")
        expect(tuple(loss.shape) == (4,), f"loss has shape {tuple(loss.shape)} for a batch of 4; expected (4,), one per sample")
        expect(loss.dtype == dtype, f"loss is {loss.dtype} for {dtype} data")
        expect(bool(torch.isfinite(loss).all()), "loss is not finite")
        expect(bool(model.calls), "the loss never calls the model")
        for x, _ in model.calls:
            expect(x.shape == x0.shape, f"the model gets x of shape {tuple(x.shape)}; expected the data's {tuple(x0.shape)}")
            expect(x.dtype == dtype, f"the model gets {x.dtype} inputs for {dtype} data")


def _loss_deterministic(t: ProcessTarget) -> None:
    process = t.build()
    data = _gaussian()
    model = t.exact(process, data)
    x0 = _batch(data, 8, seed=1)
    with global_seeds(1):
        first = process.loss(model, x0, None, _gen(5))
    with global_seeds(2):
        second = process.loss(model, x0, None, _gen(5))
    expect(torch.equal(first, second),
           "two losses with generators of the same seed differ (randomness drawn outside the generator?)")
    other = process.loss(model, x0, None, _gen(6))
    expect(not torch.equal(first, other), "the loss ignores its generator: generators of two seeds give the same loss")


def _noise_level_in_range(t: ProcessTarget) -> None:
    process = t.build()
    data = _gaussian()
    model = _Recording(t.exact(process, data))
    process.loss(model, _batch(data, 16, seed=1), None, _gen(2))
    expect(bool(model.calls), "the loss never calls the model")
    for _, time in model.calls:
        level = process.noise_level(time)
        expect(isinstance(level, Tensor), f"noise_level returned a {type(level).__name__}, not a tensor")
        expect(level.shape == time.shape, f"noise_level has shape {tuple(level.shape)} for times of {tuple(time.shape)}")
        expect(level.dtype == torch.float64, f"noise_level is {level.dtype}, not float64")
        lo, hi = level.min().item(), level.max().item()
        expect(0.0 <= lo and hi <= 1.0, f"noise_level of the times the loss gives the model spans {lo:.3g}..{hi:.3g}, "
                                        f"outside [0, 1]")


def _exact_model_lowest_loss(t: ProcessTarget) -> None:
    process = t.build()
    data = _gaussian()
    x0 = _batch(data, 512, seed=1)

    def mean_loss(of: GaussianMixture) -> float:
        return process.loss(t.exact(process, of), x0, None, _gen(2)).double().mean().item()

    best = mean_loss(data)
    for what, wrong in (("data with a shifted mean", _gaussian(shift=0.5)),
                        ("data with twice the spread", _gaussian(std=2 * GAUSSIAN_STD))):
        other = mean_loss(wrong)
        expect(best < other, f"the exact model's loss {best:.4g} is not below {other:.4g}, that of the exact model "
                             f"of {what} (loss and exact_model disagree on the target?)")


def _process_property(name: str, test: Callable[[ProcessTarget], None]) -> Property[ProcessTarget]:
    return Property(name, lambda t: run_property(t.subject, name, lambda: test(t)))


#: The properties of a diffusion process, by name, in the order
#: [`check_process`][diffit_toolkit.testing.processes.check_process] checks them.
PROCESS_PROPERTIES: dict[str, Property[ProcessTarget]] = {
    p.name: p
    for p in (
        _process_property("loss shape and dtype", _loss_shape_and_dtype),
        _process_property("loss deterministic under a seed", _loss_deterministic),
        _process_property("noise level range", _noise_level_in_range),
        _process_property("exact model has the lowest loss", _exact_model_lowest_loss),
    )
}


# -- the sampler properties, one function each --------------------------------------------------


def _sample_shape_and_dtype(t: SamplerTarget) -> None:
    process = t.build()
    model = t.process.exact(process, _gaussian())
    for dtype in (torch.float32, torch.float64):
        noise = _noise(4, seed=1, dtype=dtype)
        kept = noise.clone()
        out = t.run(process, model, noise, seed=2)
        expect(isinstance(out, Tensor), f"returned a {type(out).__name__}, not a tensor")
        expect(out.shape == noise.shape, f"returned shape {tuple(out.shape)} for noise of {tuple(noise.shape)}")
        expect(out.dtype == dtype, f"returned {out.dtype} for {dtype} noise")
        expect(bool(torch.isfinite(out).all()), "samples are not finite")
        expect(torch.equal(noise, kept), "the sampler changed its noise tensor in place")


def _sample_deterministic(t: SamplerTarget) -> None:
    process = t.build()
    model = t.process.exact(process, _gaussian())
    noise = _noise(8, seed=1)
    with global_seeds(1):
        first = t.run(process, model, noise, seed=3)
    with global_seeds(2):
        second = t.run(process, model, noise, seed=3)
    expect(torch.equal(first, second), "two runs from the same noise and generators of the same seed differ "
                                       "(randomness drawn outside the generator?)")


def _recovers_point_mass(t: SamplerTarget) -> None:
    process = t.build()
    model = t.process.exact(process, _gaussian(std=POINT_STD))
    out = t.run(process, model, _noise(16, seed=1), seed=2)
    err = (out.double().reshape(16, -1) - _center()).abs().max().item()
    expect(err <= POINT_TOLERANCE, f"with data that all equal one tensor, samples land up to {err:.3g} away from it "
                                   f"(tolerance {POINT_TOLERANCE})")


def _recovers_gaussian(t: SamplerTarget) -> None:
    process = t.build()
    model = t.process.exact(process, _gaussian())
    out = t.run(process, model, _noise(GAUSSIAN_SAMPLES, seed=1), seed=2).double().reshape(GAUSSIAN_SAMPLES, -1)
    mean_err = (out.mean(0) - _center()).abs().max().item()
    ratio = out.var(0).mean().item() / GAUSSIAN_STD**2
    expect(mean_err <= MEAN_TOLERANCE, f"samples of a Gaussian miss its mean by up to {mean_err:.3g} "
                                       f"(tolerance {MEAN_TOLERANCE})")
    expect(abs(ratio - 1) <= VARIANCE_TOLERANCE, f"samples of a Gaussian have {ratio:.3f} times its variance "
                                                 f"(tolerance 1 +- {VARIANCE_TOLERANCE})")


def _sampler_property(name: str, test: Callable[[SamplerTarget], None]) -> Property[SamplerTarget]:
    return Property(name, lambda t: run_property(t.subject, name, lambda: test(t)))


#: The properties of a sampler, by name, in the order
#: [`check_sampler`][diffit_toolkit.testing.processes.check_sampler] checks them.
SAMPLER_PROPERTIES: dict[str, Property[SamplerTarget]] = {
    p.name: p
    for p in (
        _sampler_property("output shape and dtype", _sample_shape_and_dtype),
        _sampler_property("deterministic under a seed", _sample_deterministic),
        _sampler_property("recovers a point mass", _recovers_point_mass),
        _sampler_property("recovers a Gaussian", _recovers_gaussian),
    )
}


# -- entry points ---------------------------------------------------------------------------------


def process_target(process: str | type[Process], *, options: dict[str, Any] | None = None) -> ProcessTarget:
    """The [`ProcessTarget`][diffit_toolkit.testing.processes.ProcessTarget] of a class or a
    registered name."""
    if isinstance(process, str):
        return ProcessTarget(process, processes.get(process), dict(options or {}))
    if isinstance(process, type) and issubclass(process, Process):
        return ProcessTarget(process.__name__, process, dict(options or {}))
    raise TypeError(f"expected a registered diffusion process name or a Process class, got {process!r}")


def sampler_target(
    sampler: str | Sampler,
    *,
    process: str | type[Process] | None = None,
    process_options: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> SamplerTarget:
    """The [`SamplerTarget`][diffit_toolkit.testing.processes.SamplerTarget] of a registered name
    (``<process>.<sampler>``) or a sampler function (then ``process`` names what it samples)."""
    if isinstance(sampler, str):
        name, fn = sampler, samplers.get(sampler)
        owner, _, short = sampler.partition(".")
        process = owner if process is None else process
    elif callable(sampler):
        name, fn, short = getattr(sampler, "__name__", type(sampler).__name__), sampler, "custom"
        if process is None:
            raise TypeError(f"sampler {name}: give the process it samples (process=...)")
    else:
        raise TypeError(f"expected a registered sampler name or a sampler function, got {sampler!r}")
    if short == DIFFUSERS_PREFIX:
        short = f"{DIFFUSERS_PREFIX}:{DIFFUSERS_SCHEDULER}"
    section = SampleSection(**{"sampler": short, "steps": SAMPLER_STEPS, **(settings or {})})
    return SamplerTarget(name, fn, process_target(process, options=process_options), section)


def process_checks(process: str | type[Process], *, options: dict[str, Any] | None = None) -> list[PropertyCheck]:
    """One check per property of a diffusion process, for ``@pytest.mark.parametrize`` (one test
    each; arguments as [`check_process`][diffit_toolkit.testing.processes.check_process])."""
    target = process_target(process, options=options)
    return bind(target.name, target, PROCESS_PROPERTIES.values())


def sampler_checks(
    sampler: str | Sampler,
    *,
    process: str | type[Process] | None = None,
    process_options: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> list[PropertyCheck]:
    """One check per property of a sampler, for ``@pytest.mark.parametrize`` (one test each;
    arguments as [`check_sampler`][diffit_toolkit.testing.processes.check_sampler])."""
    target = sampler_target(sampler, process=process, process_options=process_options, settings=settings)
    return bind(target.name, target, SAMPLER_PROPERTIES.values())


def check_process(process: str | type[Process], *, options: dict[str, Any] | None = None) -> ConformanceReport:
    """Check a diffusion process with its exact model; raise on the first failed property.

    The data are Gaussian, 8 values per sample as (2, 2, 2) tensors with standard deviation
    [`GAUSSIAN_STD`][diffit_toolkit.testing.processes.GAUSSIAN_STD]; the model is the process's
    [`exact_model`][diffit_toolkit.process.Process.exact_model] of them. Properties, in order (see
    [`PROCESS_PROPERTIES`][diffit_toolkit.testing.processes.PROCESS_PROPERTIES]):

    * **loss shape and dtype**: ``loss`` returns one finite value per sample, ``(B,)``, in the
      data's dtype (float32 and float64), and calls the model with inputs of the data's shape
      and dtype.
    * **loss deterministic under a seed**: generators of the same seed give the same loss
      whatever the global random state; generators of different seeds give different ones.
    * **noise level range**: ``noise_level`` maps the times the loss gives the model to
      float64 levels in [0, 1], one per sample.
    * **exact model has the lowest loss**: on the same noise, the exact model of the data has a
      lower mean loss than the exact models of data with a shifted mean and with twice the
      spread (the loss and the exact model agree on what the network predicts).

    Args:
        process: a [`Process`][diffit_toolkit.process.Process] subclass or a registered name.
        options: its recipe options (``diffusion.<key>``, e.g. ``{"prediction": "v"}``).

    Returns:
        A [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport].

    Raises:
        unittest.SkipTest: the process defines no ``exact_model``.
        ConformanceError: one line naming the process, the property and what failed.
    """
    target = process_target(process, options=options)
    target.exact(target.build(), _gaussian())  # no exact model: the whole check is skipped
    return run_checks(target.subject, bind(target.name, target, PROCESS_PROPERTIES.values()))


def check_sampler(
    sampler: str | Sampler,
    *,
    process: str | type[Process] | None = None,
    process_options: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> ConformanceReport:
    """Check a sampler with its process's exact model; raise on the first failed property.

    The sampler runs [`SAMPLER_STEPS`][diffit_toolkit.testing.processes.SAMPLER_STEPS] steps (a
    ``<process>.diffusers`` sampler with
    [`DIFFUSERS_SCHEDULER`][diffit_toolkit.testing.processes.DIFFUSERS_SCHEDULER]) on the exact
    model of toy data (8 values per sample, as (2, 2, 2) tensors). Properties, in order (see
    [`SAMPLER_PROPERTIES`][diffit_toolkit.testing.processes.SAMPLER_PROPERTIES]):

    * **output shape and dtype**: samples have the noise's shape and dtype (float32 and
      float64), are finite, and the noise tensor is left as it was.
    * **deterministic under a seed**: the same noise and generators of the same seed give the
      same samples whatever the global random state.
    * **recovers a point mass**: when every data sample equals one tensor, every generated
      sample lands within 0.05 of it.
    * **recovers a Gaussian**: 1000 samples of Gaussian data have its mean (within 0.1 per
      value) and its variance (within 10 %).

    Args:
        sampler: a registered name (``gaussian.ddim``) or a sampler function
            ``sampler(process, model, noise, y, settings, generator)``.
        process: the process it samples (default: the name's prefix).
        process_options: the process's recipe options.
        settings: ``sample`` section entries over the kit's (``steps``, ``eta``, ...).

    Returns:
        A [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport].

    Raises:
        unittest.SkipTest: the process defines no ``exact_model``, or the sampler needs
            diffusers and it is not installed.
        ConformanceError: one line naming the sampler, the property and what failed.
    """
    target = sampler_target(sampler, process=process, process_options=process_options, settings=settings)
    target.process.exact(target.build(), _gaussian())  # no exact model or no diffusers: skipped
    return run_checks(target.subject, bind(target.name, target, SAMPLER_PROPERTIES.values()))
