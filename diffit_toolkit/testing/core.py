"""What every kit of the conformance kit shares: the one-line error, the report, properties as
named checks that run one at a time, and the hypothesis settings.

A *property* ([`Property`][diffit_toolkit.testing.core.Property]) is one thing a plugin must do,
checked by one small function of a *target* (the plugin, resolved, with the kit's options). A
*check* ([`PropertyCheck`][diffit_toolkit.testing.core.PropertyCheck]) is one property bound to one
target, ready to run with no arguments: what each pytest test runs, and what ``check_*`` runs
one after another to build its [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport].
"""

from __future__ import annotations

import contextlib
import random
import re
import unittest
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from diffit_toolkit.errors import one_line
from diffit_toolkit.optional import require

require("hypothesis", "the conformance kit (diffit_toolkit.testing)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (checked just above)
from hypothesis import strategies as st  # noqa: E402

T = TypeVar("T")

#: Hypothesis examples per property (small: the kit runs for every registered plugin in CI).
DEFAULT_EXAMPLES = 4


class ConformanceError(AssertionError):
    """A plugin fails a conformance property; the message is one line naming both."""


class NotApplicable(unittest.SkipTest):
    """The property does not apply to this plugin (e.g. identity at initialisation for a mechanism
    that does not declare it): pytest reports the test as skipped, with the reason, and a
    ``check_*`` call leaves the property out of its report."""


@dataclass(frozen=True)
class ConformanceReport:
    """What a check verified.

    Attributes:
        subject: the plugin, e.g. ``conditioning mechanism 'tmsa'``.
        passed: the properties that held.
        skipped: property -> the reason it could not be checked here.
    """

    subject: str
    passed: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def _always(target: Any) -> bool:
    return True


@dataclass(frozen=True)
class Property(Generic[T]):
    """One property of a plugin kind: ``check(target)`` raises
    [`ConformanceError`][diffit_toolkit.testing.core.ConformanceError] when it fails.

    Attributes:
        name: what it checks, as messages and reports name it (``batch independence``).
        check: the check; raises ``unittest.SkipTest`` when it cannot run here.
        applies: whether the property concerns a target at all, decided without building
            anything (properties that do not apply get no test).
    """

    name: str
    check: Callable[[T], None]
    applies: Callable[[T], bool] = _always

    def __call__(self, target: T) -> None:
        with one_thread():
            self.check(target)

    @property
    def slug(self) -> str:
        """The name as a test id (``batch_independence``)."""
        return re.sub(r"[^0-9A-Za-z]+", "_", self.name).strip("_")


@dataclass(frozen=True)
class PropertyCheck:
    """One property of one plugin, ready to run: call it with no arguments.

    ``str(check)`` is its test id, ``<plugin>-<property>`` (``tmsa-batch_independence``), so
    ``pytest -k batch_independence`` picks the property for every plugin.
    """

    plugin: str
    property: str
    slug: str
    run: Callable[[], None] = field(repr=False, compare=False)

    def __call__(self) -> None:
        self.run()

    @property
    def id(self) -> str:
        return f"{self.plugin}-{self.slug}"

    def __str__(self) -> str:
        return self.id


def bind(plugin: str, target: T, properties: Iterable[Property[T]]) -> list[PropertyCheck]:
    """The checks of ``properties`` that apply to ``target``, in order."""
    return [PropertyCheck(plugin, p.name, p.slug, _runner(p, target)) for p in properties if p.applies(target)]


def _runner(prop: Property[T], target: T) -> Callable[[], None]:
    return lambda: prop(target)


def run_checks(subject: str, checks: Iterable[PropertyCheck]) -> ConformanceReport:
    """Run ``checks`` in order; the first failure raises. A property that does not apply is left
    out; one that cannot run here (``unittest.SkipTest``) is reported as skipped, with the reason."""
    passed: list[str] = []
    skipped: dict[str, str] = {}
    for check in checks:
        try:
            check()
        except NotApplicable:
            continue
        except unittest.SkipTest as skip:
            skipped[check.property] = str(skip)
            continue
        passed.append(check.property)
    return ConformanceReport(subject, tuple(passed), skipped)


# -- failing a property in one line ------------------------------------------------------------


class PropertyFailed(Exception):
    """Raised inside a property with the detail of the failure (becomes a ConformanceError)."""


def expect(condition: bool, detail: str) -> None:
    """Fail the running property with ``detail`` unless ``condition`` holds."""
    if not condition:
        raise PropertyFailed(detail)


def run_property(subject: str, prop: str, test: Callable[[], None], case: object = None) -> None:
    """Run ``test``; a failure or an exception becomes one
    [`ConformanceError`][diffit_toolkit.testing.core.ConformanceError] line naming ``subject``,
    ``prop``, what went wrong and ``case`` (when given)."""
    where = "" if case is None else f" [{case}]"
    try:
        test()
    except PropertyFailed as failed:
        raise ConformanceError(f"{subject}: {prop} failed: {failed}{where}") from None
    except unittest.SkipTest:
        raise
    except ConformanceError:
        raise
    except Exception as exc:
        raise ConformanceError(f"{subject}: {prop} failed: raised {one_line(exc)}{where}") from exc


def _settings(max_examples: int) -> settings:
    # Inherits the active hypothesis profile (database, derandomize, ...); no deadline, because
    # shared CI machines make timings noisy; the first failure is reported as found (no
    # shrinking: each example builds and runs blocks, and the message names the case anyway).
    return settings(
        max_examples=max_examples,
        deadline=None,
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def check_examples(
    subject: str, prop: str, strategy: st.SearchStrategy, test: Callable[[Any], None], max_examples: int
) -> None:
    """Run ``test`` on hypothesis examples of ``strategy``; any failure becomes one
    [`ConformanceError`][diffit_toolkit.testing.core.ConformanceError] line naming ``subject``,
    ``prop`` and the case."""

    @_settings(max_examples)
    @given(strategy)
    def run(case: Any) -> None:
        run_property(subject, prop, lambda: test(case), case)

    run()


# -- small helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread, the previous setting restored after: the kit's tensors are tiny,
    and on a loaded machine more threads make them many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic init without consuming the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def global_seeds(seed: int) -> Iterator[None]:
    """torch's, numpy's and Python's global random states set from ``seed``, restored after."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with seeded(seed):
            np.random.seed(seed)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def max_diff(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference, in float64 (0 for empty tensors)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move every parameter off its init (zero inits would hide bugs), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
