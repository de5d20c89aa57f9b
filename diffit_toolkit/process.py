"""Diffusion processes and samplers as plugins: the training loss, the samplers, and the map from
a process's time variable to what guidance needs.

A process (``gaussian``, ``edm``, ``flow``, or a user's) is a
[`Process`][diffit_toolkit.process.Process] subclass
registered under its recipe name; a sampler is a function registered under
``"<process>.<name>"`` (``gaussian.ddim``, ``edm.heun``, ``flow.heun``). The trainer and
``diffit-toolkit sample`` talk only to [`Process`][diffit_toolkit.process.Process]; the formulas live in
[`diffit_toolkit.diffusion`][diffit_toolkit.diffusion] and
[`diffit_toolkit.sampling`][diffit_toolkit.sampling], the built-in processes and
samplers in ``diffit_plugins.processes``. A model is any callable ``model(x, t, y)`` with ``t``
in the process's own time variable (the Gaussian step index, EDM's ``c_noise``, the flow time).

Guidance works the same for every process: each one maps its ``t`` to a *noise level* in
[0, 1] (1 at the start of sampling, pure noise; 0 at the data), and the guidance schedule and
interval are evaluated on that level.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor

from diffit_toolkit.errors import one_line
from diffit_toolkit.registry import DISTRIBUTION, Entry, PluginError, UnknownPluginError, processes, samplers
from diffit_toolkit.sampling.guidance import ClassifierFreeGuidance, GuidanceConfig

from diffit_toolkit.recipe import ProcessOptions

if TYPE_CHECKING:  # pragma: no cover
    from diffit_toolkit.diffusion.exact import GaussianMixture
    from diffit_toolkit.recipe import SampleSection

Model = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

#: ``sample.sampler: diffusers:<SchedulerClass>`` resolves to the process's ``diffusers`` sampler.
DIFFUSERS_PREFIX = "diffusers"


class Sampler(Protocol):
    """A registered sampler: ``sampler(process, model, noise, y, settings, generator) -> x_0``.

    ``model`` is already guided; ``settings`` is the recipe's sample section (steps, eta,
    clipping, the sampler string itself)."""

    def __call__(self, process: Process, model: Model, noise: Tensor, y: Tensor | None,
                 settings: SampleSection, generator: torch.Generator) -> Tensor: ...


class Process:
    """Base class of a diffusion process plugin (built from a recipe's ``diffusion`` section).

    Subclasses implement [`loss`][diffit_toolkit.process.Process.loss] and
    [`noise_level`][diffit_toolkit.process.Process.noise_level], declare their recipe options as
    `Options` (a [`ProcessOptions`][diffit_toolkit.recipe.ProcessOptions] subclass: typed fields
    with their ranges, and validators for combinations), and receive the validated options as
    ``config``. A process whose options have ``learn_sigma`` trains a model with a learned
    variance when it is true; one with a ``diffusers_scheduler(class_name, clip_denoised)``
    method can be exported as a diffusers pipeline.

    ```python
    class MyOptions(ProcessOptions):
        sigma_max: float = Field(80.0, gt=0)

    class MyProcess(Process):
        Options = MyOptions
    ```
    """

    #: The recipe options of this process (``diffusion.<key>``); the base class has none.
    Options: ClassVar[type[ProcessOptions]] = ProcessOptions

    def __init__(self, config: ProcessOptions) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.process

    # -- training ------------------------------------------------------------------------------
    def loss(self, model: Model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        """Per-sample training loss ``(B,)`` with all randomness drawn from ``generator``."""
        raise NotImplementedError

    # -- the exact model of known data (the conformance kit) ----------------------------------
    def exact_model(self, data: GaussianMixture) -> Model:
        """The model that is optimal for ``data`` in this process's parametrisation: what a
        network trained to convergence on ``data`` would compute, in closed form (see
        [`diffit_toolkit.diffusion.exact`][diffit_toolkit.diffusion.exact]). The conformance kit
        ([`check_process`][diffit_toolkit.testing.processes.check_process],
        [`check_sampler`][diffit_toolkit.testing.processes.check_sampler]) plugs it into the loss
        and the samplers; a process without one is skipped there."""
        raise NotImplementedError(f"the {self.name} process defines no exact_model(data)")

    # -- guidance ------------------------------------------------------------------------------
    def noise_level(self, t: Tensor) -> Tensor:
        """The model's time input ``t`` -> noise level in [0, 1] (1: pure noise), float64."""
        raise NotImplementedError

    def guided(self, model: Model, sample: SampleSection, null_class: int | None) -> Model:
        """``model`` with classifier-free guidance when the scale is not 1 and labels exist."""
        if sample.guidance_scale == 1.0 or null_class is None:
            return model
        config = GuidanceConfig(
            scale=sample.guidance_scale,
            schedule=sample.guidance_schedule,
            power=sample.guidance_power,
            interval=sample.guidance_interval,
            guided_channels=sample.guided_channels,
            noise_level=self.noise_level,
        )
        return ClassifierFreeGuidance(model, config, null_class=null_class)

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, model: Model, noise: Tensor, y: Tensor | None, sample: SampleSection,
               generator: torch.Generator, null_class: int | None = None) -> Tensor:
        """Draw ``x_0`` from ``noise`` (B, C, H, W) with the recipe's sampler and guidance."""
        entry = _sampler_entry(self.name, sample.sampler)
        guided = self.guided(model, sample, null_class if y is not None else None)
        try:
            x0 = entry.obj(self, guided, noise, y, sample, generator)
        except (PluginError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            if entry.source == DISTRIBUTION:  # the toolkit's own samplers: a bug to see in full
                raise
            raise PluginError(f"sampler '{entry.name}' (from '{entry.source}') failed: {one_line(exc)}") from exc
        if not isinstance(x0, Tensor) or x0.shape != noise.shape:
            shown = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise PluginError(f"sampler '{entry.name}' (from '{entry.source}') returned {shown} for noise of shape "
                              f"{tuple(noise.shape)}: it must return the samples in the shape of the noise")
        return x0


def sampler_names(process: str) -> list[str]:
    """Sampler names valid for ``process`` (``diffusers:<SchedulerClass>`` for a diffusers bridge)."""
    prefix = f"{process}."
    names = [n[len(prefix):] for n in samplers.names() if n.startswith(prefix)]
    return [f"{DIFFUSERS_PREFIX}:<SchedulerClass>" if n == DIFFUSERS_PREFIX else n for n in names]


def _sampler_key(process: str, sampler: str) -> str:
    """The registry name of ``sampler`` for ``process`` (``diffusers:X`` -> ``<process>.diffusers``)."""
    base = sampler.split(":", 1)[0] if sampler.startswith(f"{DIFFUSERS_PREFIX}:") else sampler
    return f"{process}.{base}"


def _sampler_entry(process: str, sampler: str) -> Entry:
    """The registry entry of ``sampler`` for ``process`` (one-line ``PluginError`` listing the valid ones)."""
    try:
        return samplers.entry(_sampler_key(process, sampler))
    except UnknownPluginError:
        valid = ", ".join(sampler_names(process)) or "none registered"
        raise PluginError(f"sampler '{sampler}' does not sample the {process} process (valid: {valid})") from None


def resolve_sampler(process: str, sampler: str) -> Sampler:
    """The sampler registered as ``"<process>.<sampler>"`` (``diffusers:X`` -> ``<process>.diffusers``).

    Raises:
        PluginError: one line listing the samplers of ``process``.
    """
    return _sampler_entry(process, sampler).obj


def build_process(config: ProcessOptions) -> Process:
    """The process of a recipe's ``diffusion`` section (validated against the process's options)."""
    return processes.build(config.process, config)

