"""The backbone kit over every registered backbone, and proof that it fails broken ones."""

from __future__ import annotations

import unittest

import numpy as np
import pytest
import torch
from torch import nn

from diffit_toolkit.testing import BACKBONE_PROPERTIES, ConformanceError, backbone_checks, check_backbone

# backbone_check: one test per registered backbone and property.
pytest_plugins = ["diffit_toolkit.testing"]


def test_every_registered_backbone_has_every_property(backbone_check):
    backbone_check()


@pytest.mark.parametrize("mechanism", ["adaln_single", "in_context", "cross_attention"])
def test_the_latent_backbone_conforms_with_mechanisms_that_share_or_append(mechanism):
    report = check_backbone("latent_diffit", options={"mechanism": mechanism})
    assert report.passed == tuple(BACKBONE_PROPERTIES)


def test_an_unconditional_image_backbone_conforms():
    report = check_backbone("image_diffit", options={"num_classes": 0})
    assert report.subject == "backbone 'image_diffit'" and report.passed == tuple(BACKBONE_PROPERTIES)


# -- broken backbones ----------------------------------------------------------------------------


class Tiny(nn.Module):
    """A minimal backbone: a 1x1 conv of x plus time and label embeddings, zero-initialised output."""

    def __init__(self, input_size=4, in_channels=2, num_classes=3, learn_sigma=False, hidden=8):
        super().__init__()
        self.config = dict(backbone="tiny", input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes, learn_sigma=learn_sigma, hidden=hidden)
        self.null_class = num_classes if num_classes else None
        self.inp = nn.Conv2d(in_channels, hidden, 1)
        self.time = nn.Linear(1, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.out = nn.Conv2d(hidden, 2 * in_channels if learn_sigma else in_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def features(self, x, t, y):
        h = self.inp(x) + self.time(t[:, None].to(x.dtype) / 1000)[:, :, None, None]  # (B, hidden, H, W)
        if self.label is not None:
            y = torch.full_like(t, self.null_class, dtype=torch.long) if y is None else y
            h = h + self.label(y)[:, :, None, None]
        return torch.nn.functional.silu(h)

    def forward(self, x, t, y=None):
        return self.out(self.features(x, t, y))


def tiny(preset=None, **options):
    return Tiny(**options)


class BatchStatistics(Tiny):
    def features(self, x, t, y):
        h = super().features(x, t, y)
        return h - h.mean(0, keepdim=True)


class IgnoresLearnSigma(Tiny):
    def __init__(self, learn_sigma=False, **options):
        super().__init__(**options)
        self.config["learn_sigma"] = learn_sigma


class NotZero(Tiny):
    def __init__(self, **options):
        super().__init__(**options)
        nn.init.ones_(self.out.weight)


class HiddenState(Tiny):
    def __init__(self, **options):
        super().__init__(**options)
        self.secret = torch.randn(self.config["hidden"], 1, 1)  # a plain attribute, not a buffer

    def features(self, x, t, y):
        return super().features(x, t, y) + self.secret.to(x.dtype)


class ForgetsAnOption(Tiny):
    """Its config leaves out the width, so a rebuilt model has the default one."""

    def __init__(self, **options):
        super().__init__(**options)
        del self.config["hidden"]


class InitFromNumpy(Tiny):
    """Initialises a layer from numpy's global random state, which a torch seed does not set."""

    def __init__(self, **options):
        super().__init__(**options)
        with torch.no_grad():
            self.inp.weight.copy_(torch.from_numpy(np.random.randn(*self.inp.weight.shape)))


def _factory(cls):
    def factory(preset=None, **options):
        return cls(**options)

    factory.__name__ = cls.__name__
    factory.toy_options, factory.zero_output_at_init = {}, True
    return factory


def test_a_correct_backbone_passes():
    assert check_backbone(_factory(Tiny)).passed == tuple(BACKBONE_PROPERTIES)


@pytest.mark.parametrize(
    ("cls", "options", "prop", "detail"),
    [
        (BatchStatistics, {}, "batch independence", "changed by"),
        (IgnoresLearnSigma, {}, "output shape", "with learn_sigma=True (labels); expected (3, 4, 4, 4)"),
        (NotZero, {}, "zero output at initialisation", "declares zero_output_at_init but a fresh model outputs"),
        (HiddenState, {}, "state_dict round trip", "state outside the state_dict"),
        (ForgetsAnOption, {"hidden": 4}, "config rebuilds the model", "raised RuntimeError"),
        (InitFromNumpy, {}, "deterministic under a seed", "two builds under the same seed differ at 'inp.weight'"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_the_kit_fails_a_broken_backbone_in_one_line(cls, options, prop, detail):
    with pytest.raises(ConformanceError) as info:
        check_backbone(_factory(cls), options=options)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"backbone '{cls.__name__}': {prop} failed: ")
    assert detail in message


def test_each_property_is_its_own_test():
    checks = backbone_checks(_factory(BatchStatistics))
    assert [str(c) for c in checks] == [f"BatchStatistics-{p.slug}" for p in BACKBONE_PROPERTIES.values()]
    failed = []
    for check in checks:
        try:
            check()
        except ConformanceError:
            failed.append(check.property)
    assert failed == ["batch independence"]


def test_a_factory_without_toy_options_is_skipped():
    with pytest.raises(unittest.SkipTest, match="declares no toy_options"):
        check_backbone(tiny)
