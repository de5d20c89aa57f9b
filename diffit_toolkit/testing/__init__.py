"""Conformance kit for plugin authors: the properties every conditioning mechanism, attention
backend, diffusion process, sampler, dataset kind and backbone must have, each checked at toy
size by one small function.

Call a whole kit from a test:

```python
from diffit_toolkit.testing import check_attention_backend, check_mechanism

def test_my_mechanism_conforms():
    check_mechanism(MyMechanism)              # a class, or a registered name

def test_my_backend_conforms():
    check_attention_backend(MY_BACKEND)       # an AttentionBackend, or a registered name
```

or get one test per property, so that a failure hides no other and ``-k`` picks a property:

```python
@pytest.mark.parametrize("check", mechanism_checks(MyMechanism), ids=str)
def test_my_mechanism(check):               # test ids: MyMechanism-batch_independence, ...
    check()
```

The kits: [`check_mechanism`][diffit_toolkit.testing.mechanisms.check_mechanism],
[`check_attention_backend`][diffit_toolkit.testing.attention.check_attention_backend],
[`check_process`][diffit_toolkit.testing.processes.check_process],
[`check_sampler`][diffit_toolkit.testing.processes.check_sampler],
[`check_dataset`][diffit_toolkit.testing.datasets.check_dataset] and
[`check_backbone`][diffit_toolkit.testing.backbones.check_backbone], each with its ``*_checks``
twin that returns the properties one by one.

A failed property raises [`ConformanceError`][diffit_toolkit.testing.core.ConformanceError] (an
``AssertionError``) whose message is one
line: the plugin, the property, what went wrong and the first failing case, e.g.
``conditioning mechanism 'MixesBatch': batch independence failed: output of sample 1 changed by
9.6e-01 when only sample 0 changed [dim=4 heads=1 cond_dim=4 grid=2x2 window=None bias=False
batch=2 seed=0]``. A passing check returns a
[`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport] listing what was checked
and what was skipped, with the reason (e.g. a backend with no backward pass on this device).

As a pytest plugin (``pytest_plugins = ["diffit_toolkit.testing"]`` in your root
``conftest.py``, or ``pytest -p diffit_toolkit.testing``), a test that takes one of these
arguments runs once per registered name, or once per registered name and property (see
[`pytest_generate_tests`][diffit_toolkit.testing.pytest_generate_tests]):

```python
def test_every_mechanism(conditioning_name):
    check_mechanism(conditioning_name)

def test_every_mechanism_property(conditioning_check):   # tmsa-batch_independence, ...
    conditioning_check()
```

The kit needs the test dependencies (``pip install "diffit-toolkit[dev]"``: pytest, hypothesis).
Call the checks from a plain test function, not from inside a hypothesis ``@given`` test. The
kit raises its own messages, so pytest need not rewrite its asserts (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffit_toolkit.nn.block import SITE_SHAPES
from diffit_toolkit import registry
from diffit_toolkit.testing.attention import (
    ATTENTION_PROPERTIES,
    TOLERANCE,
    attention_backend_checks,
    check_attention_backend,
)
from diffit_toolkit.testing.backbones import BACKBONE_PROPERTIES, backbone_checks, check_backbone
from diffit_toolkit.testing.core import (
    DEFAULT_EXAMPLES,
    ConformanceError,
    ConformanceReport,
    NotApplicable,
    Property,
    PropertyCheck,
)
from diffit_toolkit.testing.datasets import DATASET_PROPERTIES, check_dataset, dataset_checks, embedded_kinds
from diffit_toolkit.testing.mechanisms import (
    DEAD_PARAMETER_STEPS,
    MECHANISM_PROPERTIES,
    check_mechanism,
    mechanism_checks,
)
from diffit_toolkit.testing.processes import (
    PROCESS_PROPERTIES,
    SAMPLER_PROPERTIES,
    check_process,
    check_sampler,
    process_checks,
    sampler_checks,
)

__all__ = [
    "ATTENTION_PROPERTIES",
    "BACKBONE_PROPERTIES",
    "DATASET_PROPERTIES",
    "DEAD_PARAMETER_STEPS",
    "DEFAULT_EXAMPLES",
    "MECHANISM_PROPERTIES",
    "PLUGIN_ARGUMENTS",
    "PROCESS_PROPERTIES",
    "SAMPLER_PROPERTIES",
    "SITE_SHAPES",
    "TOLERANCE",
    "ConformanceError",
    "ConformanceReport",
    "NotApplicable",
    "Property",
    "PropertyCheck",
    "attention_backend_checks",
    "backbone_checks",
    "check_attention_backend",
    "check_backbone",
    "check_dataset",
    "check_mechanism",
    "check_process",
    "check_sampler",
    "dataset_checks",
    "mechanism_checks",
    "process_checks",
    "pytest_generate_tests",
    "sampler_checks",
]

#: Test arguments the pytest plugin fills, by kind: ``(names argument, checks argument, the
#: registered names, their checks)``. A test that takes the first runs once per name; one that
#: takes the second, once per name and property (test id ``<name>-<property>``).
PLUGIN_ARGUMENTS: dict[str, tuple[str, str, Callable[[], list[str]], Callable[[str], list[PropertyCheck]]]] = {
    "conditioning": ("conditioning_name", "conditioning_check", registry.conditioning.names, mechanism_checks),
    "attention": ("attention_backend_name", "attention_backend_check", registry.attention_backends.names,
                  attention_backend_checks),
    "process": ("process_name", "process_check", registry.processes.names, process_checks),
    "sampler": ("sampler_name", "sampler_check", registry.samplers.names, sampler_checks),
    "dataset": ("dataset_name", "dataset_check", embedded_kinds, dataset_checks),
    "backbone": ("backbone_name", "backbone_check", registry.backbones.names, backbone_checks),
}


def pytest_generate_tests(metafunc: Any) -> None:
    """Parametrise test arguments over every registered plugin of a kind:

    | argument | runs once per |
    |---|---|
    | ``conditioning_name`` / ``conditioning_check`` | mechanism / mechanism and property |
    | ``attention_backend_name`` / ``attention_backend_check`` | backend / backend and property |
    | ``process_name`` / ``process_check`` | diffusion process / process and property |
    | ``sampler_name`` / ``sampler_check`` | sampler (``gaussian.ddim``) / sampler and property |
    | ``dataset_name`` / ``dataset_check`` | dataset kind that builds without files / kind and property |
    | ``backbone_name`` / ``backbone_check`` | backbone / backbone and property |

    A ``*_check`` argument is a [`PropertyCheck`][diffit_toolkit.testing.core.PropertyCheck]: call
    it. Test ids are ``<name>-<property>`` (``tmsa-batch_independence``), so ``-k`` picks a plugin,
    a property or both.
    """
    for names_arg, checks_arg, names, checks in PLUGIN_ARGUMENTS.values():
        if names_arg in metafunc.fixturenames:
            metafunc.parametrize(names_arg, names())
        if checks_arg in metafunc.fixturenames:
            found = [check for name in names() for check in checks(name)]
            metafunc.parametrize(checks_arg, found, ids=[c.id for c in found])
