"""The conformance kit over every registered plugin, and proof that it fails broken ones."""

from __future__ import annotations

import dataclasses
import unittest

import pytest
import torch
from torch import nn

from diffit_toolkit import AttentionBackend, BlockSpec, ConditioningMechanism, Injection
from diffit_toolkit.nn.attention import attention_math
from diffit_toolkit.registry import conditioning
from diffit_toolkit.testing import (
    ATTENTION_PROPERTIES,
    MECHANISM_PROPERTIES,
    SITE_SHAPES,
    ConformanceError,
    attention_backend_checks,
    check_attention_backend,
    check_mechanism,
    mechanism_checks,
)

# The kit as a pytest plugin: an argument named conditioning_check / attention_backend_check
# runs once per registered name and property (conditioning_name / attention_backend_name: once
# per name); pytester runs the plugin on generated test files.
pytest_plugins = ["diffit_toolkit.testing", "pytester"]


def test_every_registered_mechanism_has_every_property(conditioning_check):
    conditioning_check()


def test_every_registered_attention_backend_has_every_property(attention_backend_check):
    attention_backend_check()


def test_the_registered_names_are_what_the_plugin_parametrises(request):
    """The pytest plugin is loaded and covers the registry, not a hand-written list."""
    assert request.config.pluginmanager.has_plugin("diffit_toolkit.testing")
    assert {"tmsa", "window_tmsa", "adaln_zero", "relative_bias", "mlp", "separate_token", "additive"} <= set(
        conditioning.names()
    )


def test_one_check_per_mechanism_property_with_a_test_id():
    ids = [str(c) for c in mechanism_checks("adaln_zero")]
    assert ids == [f"adaln_zero-{p.slug}" for p in MECHANISM_PROPERTIES.values()]
    assert "adaln_zero-batch_independence" in ids and "adaln_zero-torch_compile" in ids
    # identity at initialisation applies only where the class declares it
    assert [c.property for c in mechanism_checks("tmsa")] == list(MECHANISM_PROPERTIES)[:-1]
    assert [c.property for c in attention_backend_checks("math")] == list(ATTENTION_PROPERTIES)


def test_check_mechanism_reports_every_property_it_ran():
    report = check_mechanism(Good, max_examples=2)
    assert report.subject == "conditioning mechanism 'Good'"
    assert report.passed == tuple(p for p in MECHANISM_PROPERTIES if p != "identity at initialisation")
    assert report.skipped == {}


def test_the_plugin_gives_one_test_per_plugin_and_property_that_k_selects(pytester):
    pytester.makepyfile(
        """
        def test_mechanism(conditioning_check):
            conditioning_check()

        def test_named(conditioning_name):
            pass
        """
    )
    result = pytester.runpytest_inprocess("-p", "diffit_toolkit.testing", "--collect-only", "-q",
                                          "-k", "batch_independence and not window")
    ids = [line.split("::")[-1] for line in result.outlines if "::" in line]
    assert "test_mechanism[tmsa-batch_independence]" in ids
    assert len(ids) == len(conditioning.names()) - 1  # every mechanism but window_tmsa, one property
    assert all(i.endswith("-batch_independence]") for i in ids)


def test_every_injection_site_has_a_documented_shape_rule():
    assert list(SITE_SHAPES) == [f.name for f in dataclasses.fields(Injection)]


def test_adaln_zero_declares_identity_and_its_final_layer():
    cls = conditioning.get("adaln_zero")
    assert cls.identity_at_init and cls.final_layer == "adaln"
    assert not conditioning.get("tmsa").identity_at_init and conditioning.get("tmsa").final_layer is None


# -- broken mechanisms: the kit must name the property each one violates ----------------------


class Good(ConditioningMechanism):
    """A correct mechanism (MLP injection): the base every broken one below changes in one place."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.proj = nn.Linear(spec.cond_dim, spec.dim)

    def forward(self, c: torch.Tensor) -> Injection:
        return Injection(mlp_in=self.proj(c)[:, None])


class MixesBatch(Good):
    """Conditions every sample on the batch mean (a classic batch-statistics leak)."""

    def forward(self, c):
        return Injection(mlp_in=self.proj(c.mean(0, keepdim=True).expand_as(c))[:, None])


class DeadParameter(Good):
    """Creates a parameter it never uses."""

    def __init__(self, spec):
        super().__init__(spec)
        self.forgotten = nn.Linear(spec.cond_dim, spec.dim)


class ZeroChain(Good):
    """Two zero-initialised layers in a row: neither ever receives a gradient."""

    def __init__(self, spec):
        super().__init__(spec)
        self.first, self.second = nn.Linear(spec.cond_dim, spec.dim), nn.Linear(spec.dim, spec.dim)
        for layer in (self.first, self.second):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, c):
        return Injection(mlp_in=(self.proj(c) + self.second(self.first(c)))[:, None])


class GatedFromZero(Good):
    """A zero-initialised gate on the branch the projection feeds (adaLN-Zero's pattern): the
    projection gets no gradient at step 0, but does once the gate has moved."""

    identity_at_init = True

    def __init__(self, spec):
        super().__init__(spec)
        self.gate = nn.Linear(spec.cond_dim, spec.dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, c):
        return Injection(mlp_in=self.proj(c)[:, None], gate_mlp=self.gate(c)[:, None], gate_attn=self.gate(c)[:, None])


class DeclaredUnused(DeadParameter):
    unused_parameters = frozenset({"forgotten.weight", "forgotten.bias"})


class IgnoresTime(Good):
    def forward(self, c):
        return Injection(mlp_in=self.proj(torch.zeros_like(c))[:, None])


class WrongShape(Good):
    def forward(self, c):
        return Injection(mlp_in=self.proj(c))  # (B, D): broadcasts against (B, N, D) wrongly


class WrongDtype(Good):
    def forward(self, c):
        return Injection(mlp_in=self.proj(c)[:, None].float())


class NotIdentity(Good):
    identity_at_init = True  # claims adaLN-Zero's property without zero gates


class HiddenState(Good):
    """Keeps a random tensor outside the state_dict."""

    def __init__(self, spec):
        super().__init__(spec)
        self.secret = torch.randn(spec.dim)

    def forward(self, c):
        return Injection(mlp_in=(self.proj(c) + self.secret.to(c.dtype))[:, None])


class GraphBreak(Good):
    def forward(self, c):
        if c.sum().item() > 1e9:  # data-dependent Python branch: a graph break
            c = c * 2
        return super().forward(c)


class GraphBreakDeclared(GraphBreak):
    compile_fullgraph = False


@pytest.mark.parametrize(
    ("cls", "prop", "detail"),
    [
        (MixesBatch, "batch independence", "output of sample"),
        (DeadParameter, "no dead parameters", "'forgotten.weight' receives no gradient"),
        (ZeroChain, "no dead parameters", "'first.weight' receives no gradient in 3 SGD steps"),
        (IgnoresTime, "conditioning reaches the output", "leaves its output unchanged"),
        (WrongShape, "output shapes and dtypes", "injection site 'mlp_in' has shape"),
        (WrongDtype, "output shapes and dtypes", "injection site 'mlp_in' is torch.float32 for torch.float64"),
        (NotIdentity, "identity at initialisation", "declares identity_at_init"),
        (HiddenState, "state_dict round trip", "state outside the state_dict"),
        (GraphBreak, "torch.compile (fullgraph)", "raised"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_the_kit_fails_a_broken_mechanism_in_one_line(cls, prop, detail):
    with pytest.raises(ConformanceError) as info:
        check_mechanism(cls, max_examples=2)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"conditioning mechanism '{cls.__name__}': {prop} failed: ")
    assert detail in message
    assert isinstance(info.value, AssertionError)


def test_one_broken_property_fails_alone():
    """Each property is its own check: a batch-statistics leak fails batch independence only."""
    failed = []
    for check in mechanism_checks(MixesBatch, max_examples=2):
        try:
            check()
        except ConformanceError as exc:
            failed.append(check.id)
            assert str(exc).startswith("conditioning mechanism 'MixesBatch': batch independence failed: ")
    assert failed == ["MixesBatch-batch_independence"]


@pytest.mark.parametrize("cls", [DeclaredUnused, GraphBreakDeclared, GatedFromZero], ids=lambda c: c.__name__)
def test_the_kit_passes_honestly_declared_mechanisms(cls):
    assert "no dead parameters" in check_mechanism(cls, max_examples=2).passed


def test_the_documented_user_mechanism_conforms(plugin_system):
    """docs/examples/user_plugin.py (the page's example) passes the kit it recommends."""
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "user_plugin.py"
    namespace = runpy.run_path(str(example))
    assert "torch.compile" in check_mechanism(namespace["GatedTMSA"], max_examples=2).passed


def test_declaring_a_used_parameter_unused_fails():
    class Overclaims(Good):
        unused_parameters = frozenset({"proj.weight"})

    with pytest.raises(ConformanceError, match="'proj.weight' is declared unused but receives a gradient"):
        check_mechanism(Overclaims, max_examples=2)


# -- broken attention backends ---------------------------------------------------------------


def _backend(fn, **kwargs) -> AttentionBackend:
    return AttentionBackend(name=fn.__name__, fn=fn, devices=frozenset({"cpu"}), **kwargs)


def drops_bias(q, k, v, bias, scale):
    return attention_math(q, k, v, None, scale)


def mixes_batch(q, k, v, bias, scale):
    return attention_math(q, k.mean(0, keepdim=True).expand_as(k), v, bias, scale)


def wrong_dtype(q, k, v, bias, scale):
    return attention_math(q, k, v, bias, scale).float()


def ignores_extra_keys(q, k, v, bias, scale):
    n = q.shape[2]
    return attention_math(q, k[:, :, :n], v[:, :, :n], None if bias is None else bias[..., :n], scale)


def detached(q, k, v, bias, scale):
    return attention_math(q, k, v, None if bias is None else bias.detach(), scale)


@pytest.mark.parametrize(
    ("fn", "kwargs", "prop"),
    [
        (drops_bias, {}, "kernel equals math"),
        (mixes_batch, {}, "kernel equals math"),
        (wrong_dtype, {"dtypes": frozenset({torch.float16})}, "kernel equals math"),
        (ignores_extra_keys, {}, "kernel equals math"),
        (detached, {"dtypes": frozenset({torch.float32})}, "gradients equal math"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_the_kit_fails_a_broken_attention_backend(fn, kwargs, prop):
    with pytest.raises(ConformanceError) as info:
        check_attention_backend(_backend(fn, **kwargs), max_examples=10)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"attention backend '{fn.__name__}': {prop} failed: ")


def test_a_leak_below_the_equivalence_tolerance_is_caught_by_batch_independence():
    """A kernel within tolerance of math for every input, whose outputs still depend on the
    other samples of the batch (e.g. a batch-wide statistic): only batch independence sees it."""

    def subtle_leak(q, k, v, bias, scale):
        return attention_math(q, k, v, bias, scale) + 1e-6 * q.mean(0, keepdim=True)

    backend = _backend(subtle_leak, dtypes=frozenset({torch.float32}))
    with pytest.raises(ConformanceError, match="attention backend 'subtle_leak': batch independence failed: other samples"):
        check_attention_backend(backend, max_examples=10)


def test_unavailable_backend_is_skipped_with_its_reason():
    backend = _backend(attention_math, availability=lambda: "needs the frobnicator")
    with pytest.raises(unittest.SkipTest, match="needs the frobnicator"):
        check_attention_backend(backend)
    cuda_only = AttentionBackend(name="cuda_only", fn=attention_math, devices=frozenset({"cuda"}))
    with pytest.raises(unittest.SkipTest, match="runs on cuda, not on cpu"):
        check_attention_backend(cuda_only, device="cpu")


def test_a_backend_without_backward_here_skips_the_gradient_check_with_a_reason():
    backend = _backend(attention_math, backward_devices=frozenset({"cuda"}))
    report = check_attention_backend(backend, max_examples=2)
    assert "gradients equal math" not in report.passed
    assert "no backward pass on cpu" in report.skipped["gradients equal math"]
