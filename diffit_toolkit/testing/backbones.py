"""The conformance kit for backbones: what the trainer, the samplers and the checkpoints rely on.

A backbone is a registered factory ``factory(preset, **options) -> nn.Module`` called as
``model(x, t, y)``. The kit builds it at toy size: with the options the factory declares in its
``toy_options`` attribute (the built-ins declare a two-block model with a 4x4 token grid), or
those given. The toolkit passes every backbone ``input_size``, ``in_channels``, ``num_classes``
and ``learn_sigma``, and reads the built model's ``config`` (its registry name under
``backbone`` and every constructor option) to save and rebuild it, so the kit does the same.
"""

from __future__ import annotations

import json
import unittest
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffit_toolkit.registry import backbones
from diffit_toolkit.testing.core import (
    ConformanceReport,
    Property,
    PropertyCheck,
    bind,
    expect,
    max_diff,
    perturb_,
    run_checks,
    run_property,
    seeded,
)

__all__ = [
    "BACKBONE_PROPERTIES",
    "BackboneTarget",
    "backbone_checks",
    "check_backbone",
]

Factory = Callable[..., nn.Module]

_BATCH = 3
_TOL = 1e-9  # float64 round-off


@dataclass(frozen=True)
class BackboneTarget:
    """A backbone as the kit checks it.

    Attributes:
        name: registered name (or the factory's ``__name__``).
        factory: ``factory(preset, **options) -> nn.Module``.
        preset: the preset it is built from (``None``: its defaults, overridden by ``options``).
        options: the toy options (the factory's ``toy_options``, then those given); ``None``
            when there are none (the checks are then skipped).
    """

    name: str
    factory: Factory
    preset: str | None = None
    options: dict[str, Any] | None = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"backbone '{self.name}'"

    def build(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """The model built under ``seed`` (the caller's random state untouched), in eval mode.

        Raises:
            unittest.SkipTest: no toy options (``options`` is ``None``): its defaults may be a
                full-size model.
        """
        if self.options is None:
            raise unittest.SkipTest(f"{self.subject} declares no toy_options; set factory.toy_options or give options")
        with seeded(seed):
            model = self.factory(self.preset, **{**self.options, **overrides})
        expect(isinstance(model, nn.Module), f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
        return model.eval()

    def config(self, model: nn.Module) -> Mapping[str, Any]:
        config = getattr(model, "config", None)
        expect(isinstance(config, Mapping), "the model has no config dict (model.config), which checkpoints record")
        return config

    def inputs(self, model: nn.Module, seed: int, dtype: torch.dtype = torch.float64,
               **overrides: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """``x`` (B, C, H, W), ``t`` (B,) in [0, 1000) and labels (``None`` when unconditional), as
        the model's config declares them."""
        config = {**self.config(model), **overrides}
        for key in ("in_channels", "input_size", "num_classes"):
            expect(isinstance(config.get(key), int), f"the model's config has no integer '{key}'")
        g = torch.Generator().manual_seed(seed)
        size, classes = config["input_size"], config["num_classes"]
        x = torch.randn(_BATCH, config["in_channels"], size, size, generator=g, dtype=torch.float64).to(dtype)
        t = (torch.rand(_BATCH, generator=g, dtype=torch.float64) * 1000).to(dtype)
        y = torch.randint(0, classes, (_BATCH,), generator=g) if classes > 0 else None
        return x, t, y

    def perturbed(self, seed: int = 0) -> nn.Module:
        """A float64 model with every parameter moved off its init (a fresh one outputs 0)."""
        model = self.build(seed).double()
        perturb_(model, seed + 1, scale=0.05)
        return model


# -- the properties, one function each ------------------------------------------------------------


def _output_shape(t: BackboneTarget) -> None:
    for learn_sigma in (False, True):
        model = t.build(learn_sigma=learn_sigma)
        x, time, y = t.inputs(model, seed=1, dtype=torch.float32)
        c = x.shape[1]
        expected = (x.shape[0], 2 * c if learn_sigma else c, *x.shape[2:])
        with torch.no_grad():
            outs = [("labels", model(x, time, y))] + ([("y=None", model(x, time, None))] if y is not None else [])
        for what, out in outs:
            expect(isinstance(out, Tensor), f"returned a {type(out).__name__}, not a tensor")
            expect(tuple(out.shape) == expected, f"output shape {tuple(out.shape)} for input {tuple(x.shape)} with "
                                                 f"learn_sigma={learn_sigma} ({what}); expected {expected}")
            expect(out.dtype == x.dtype, f"output is {out.dtype} for {x.dtype} input")
            expect(bool(torch.isfinite(out).all()), f"output is not finite ({what})")


def _zero_output_at_init(t: BackboneTarget) -> None:
    model = t.build()
    x, time, y = t.inputs(model, seed=1, dtype=torch.float32)
    with torch.no_grad():
        out = model(x, time, y)
    expect(not bool(out.any()), f"declares zero_output_at_init but a fresh model outputs up to "
                                f"{out.abs().max().item():.2g} (is its output layer zero-initialised?)")


def _batch_independence(t: BackboneTarget) -> None:
    model = t.perturbed()
    x, time, y = t.inputs(model, seed=1)
    with torch.no_grad():
        out = model(x, time, y)
        x2, time2, y2 = x.clone(), time.clone(), None if y is None else y.clone()
        x2[0] += 1.0 + torch.randn_like(x2[0])
        time2[0] = 1000 - time2[0]
        if y2 is not None:
            y2[0] = (y2[0] + 1) % t.config(model)["num_classes"]
        out2 = model(x2, time2, y2)
    diff = max_diff(out2[1:], out[1:])
    expect(diff <= _TOL * (1 + out[1:].abs().max().item()),
           f"output of samples 1..{_BATCH - 1} changed by {diff:.1e} when only sample 0 changed (eval mode)")


def _state_dict_round_trip(t: BackboneTarget) -> None:
    first = t.perturbed(seed=0)
    second = t.build(seed=7).double()
    second.load_state_dict(first.state_dict())
    x, time, y = t.inputs(first, seed=1)
    with torch.no_grad():
        a, b = first(x, time, y), second(x, time, y)
    diff = max_diff(a, b)
    expect(diff <= _TOL * (1 + a.abs().max().item()),
           f"a model loaded from another's state_dict differs by {diff:.1e} (state outside the state_dict?)")


def _config_rebuilds(t: BackboneTarget) -> None:
    first = t.perturbed(seed=0)
    config = dict(t.config(first))
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        expect(False, f"model.config is not JSON ({exc}); checkpoints store it as JSON")
    name = config.pop("backbone", None)
    expect(name is not None, "model.config has no 'backbone' entry (the registry name that rebuilds it)")
    expect(name == t.name or t.name not in backbones, f"model.config names backbone '{name}', registered as '{t.name}'")
    with seeded(7):
        rebuilt = t.factory(None, **config)
    rebuilt = rebuilt.double().eval()
    rebuilt.load_state_dict(first.state_dict())
    x, time, y = t.inputs(first, seed=1)
    with torch.no_grad():
        a, b = first(x, time, y), rebuilt(x, time, y)
    diff = max_diff(a, b)
    expect(diff <= _TOL * (1 + a.abs().max().item()),
           f"the model rebuilt from model.config (no preset) differs by {diff:.1e}")


def _deterministic(t: BackboneTarget) -> None:
    first, second = t.build(seed=3), t.build(seed=3)
    state_a, state_b = first.state_dict(), second.state_dict()
    expect(list(state_a) == list(state_b), "two builds under the same seed have different state_dict keys")
    for key in state_a:
        expect(torch.equal(state_a[key], state_b[key]), f"two builds under the same seed differ at '{key}'")
    perturb_(first, 4, scale=0.05)
    x, time, y = t.inputs(first, seed=1, dtype=torch.float32)
    with torch.no_grad():
        expect(torch.equal(first(x, time, y), first(x, time, y)), "two calls on the same input differ (eval mode)")
    first.train()  # label dropout draws from the global random state: the same seed, the same draws
    with torch.no_grad(), seeded(5):
        a = first(x, time, y)
    with torch.no_grad(), seeded(5):
        b = first(x, time, y)
    expect(torch.equal(a, b), "two calls in training mode under the same seed differ")


def _backbone_property(name: str, test: Callable[[BackboneTarget], None],
                       applies: Callable[[BackboneTarget], bool] | None = None) -> Property[BackboneTarget]:
    return Property(name, lambda t: run_property(t.subject, name, lambda: test(t)), applies or (lambda t: True))


#: The properties of a backbone, by name, in the order
#: [`check_backbone`][diffit_toolkit.testing.backbones.check_backbone] checks them ("zero output
#: at initialisation" only for factories that declare ``zero_output_at_init = True``).
BACKBONE_PROPERTIES: dict[str, Property[BackboneTarget]] = {
    p.name: p
    for p in (
        _backbone_property("output shape", _output_shape),
        _backbone_property("zero output at initialisation", _zero_output_at_init,
                           applies=lambda t: bool(getattr(t.factory, "zero_output_at_init", False))),
        _backbone_property("batch independence", _batch_independence),
        _backbone_property("state_dict round trip", _state_dict_round_trip),
        _backbone_property("config rebuilds the model", _config_rebuilds),
        _backbone_property("deterministic under a seed", _deterministic),
    )
}


def backbone_target(backbone: str | Factory, *, preset: str | None = None,
                    options: dict[str, Any] | None = None) -> BackboneTarget:
    """The [`BackboneTarget`][diffit_toolkit.testing.backbones.BackboneTarget] of a factory or a
    registered name: its ``toy_options``, then ``options``."""
    if isinstance(backbone, str):
        name, factory = backbone, backbones.get(backbone)
    elif callable(backbone):
        name, factory = getattr(backbone, "__name__", type(backbone).__name__), backbone
    else:
        raise TypeError(f"expected a registered backbone name or a backbone factory, got {backbone!r}")
    toy = getattr(factory, "toy_options", None)
    if toy is None and options is None and preset is None:
        return BackboneTarget(name, factory, None, None)
    return BackboneTarget(name, factory, preset, {**(toy or {}), **(options or {})})


def backbone_checks(backbone: str | Factory, *, preset: str | None = None,
                    options: dict[str, Any] | None = None) -> list[PropertyCheck]:
    """One check per property of a backbone, for ``@pytest.mark.parametrize`` (one test each;
    arguments as [`check_backbone`][diffit_toolkit.testing.backbones.check_backbone])."""
    target = backbone_target(backbone, preset=preset, options=options)
    return bind(target.name, target, BACKBONE_PROPERTIES.values())


def check_backbone(backbone: str | Factory, *, preset: str | None = None,
                   options: dict[str, Any] | None = None) -> ConformanceReport:
    """Check a backbone at toy size; raise on the first failed property.

    Properties, in order (see
    [`BACKBONE_PROPERTIES`][diffit_toolkit.testing.backbones.BACKBONE_PROPERTIES]); inputs are
    shaped by the model's ``config`` (``in_channels``, ``input_size``, ``num_classes``):

    * **output shape**: ``model(x, t, y)`` returns ``(B, C, H, W)`` for ``learn_sigma=False`` and
      ``(B, 2C, H, W)`` for ``learn_sigma=True``, finite, in the input's dtype; with labels and,
      for a class-conditional model, with ``y=None`` (the null class).
    * **zero output at initialisation**: only for factories that set
      ``zero_output_at_init = True`` (the built-ins: their output layer is zero-initialised, as
      DiT's): a fresh model outputs exactly 0.
    * **batch independence**: in eval mode, changing sample 0's input, time and label changes
      no other sample's output (float64, parameters moved off their init).
    * **state_dict round trip**: a second model that loads the first one's ``state_dict``
      computes the same output (no state outside the state dict).
    * **config rebuilds the model**: ``model.config`` is JSON with the registry name under
      ``backbone``, and the factory called with the rest (no preset) builds a model that loads
      the ``state_dict`` and computes the same output, as a checkpoint is reloaded.
    * **deterministic under a seed**: two builds under the same seed have identical weights; two
      calls give identical outputs (in training mode too, under the same seed).

    Args:
        backbone: a registered name or a factory ``factory(preset, **options)``.
        preset: the preset to build (default ``None``: the factory's defaults).
        options: options over the factory's ``toy_options``.

    Returns:
        A [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport].

    Raises:
        unittest.SkipTest: no ``toy_options`` declared and no options given.
        ConformanceError: one line naming the backbone, the property and what failed.
    """
    target = backbone_target(backbone, preset=preset, options=options)
    if target.options is None:
        target.build()  # raises the SkipTest: no toy options
    return run_checks(target.subject, bind(target.name, target, BACKBONE_PROPERTIES.values()))
