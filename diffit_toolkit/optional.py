"""Optional dependencies: whether each is installed, and one message style when it is not.

Each is found through lightning-utilities' ``RequirementCache`` (package metadata, checked once
and without importing the package) and installed through an extra of the same name:

```bash
pip install 'diffit-toolkit[wandb]'
```
"""

from __future__ import annotations

from lightning_utilities.core.imports import RequirementCache

from diffit_toolkit.errors import UsageError

#: Every optional dependency: its requirement and the extra (in ``pyproject.toml``) that installs it.
OPTIONAL: dict[str, tuple[RequirementCache, str]] = {
    "xformers": (RequirementCache("xformers"), "xformers"),
    "triton": (RequirementCache("triton"), "triton"),
    "tensorboard": (RequirementCache("tensorboard"), "tensorboard"),
    "wandb": (RequirementCache("wandb"), "wandb"),
    "hypothesis": (RequirementCache("hypothesis"), "testing"),
    "submitit": (RequirementCache("submitit"), "cluster"),
}


class MissingDependencyError(UsageError, ImportError):
    """An optional dependency a recipe or command asked for is not installed (one line)."""


def missing(name: str) -> str | None:
    """``None`` when the optional dependency ``name`` is installed, else the one-line reason
    (``wandb is not installed: pip install 'diffit-toolkit[wandb]'``)."""
    requirement, extra = OPTIONAL[name]
    if requirement:
        return None
    return f"{name} is not installed: pip install 'diffit-toolkit[{extra}]'"


def require(name: str, purpose: str) -> None:
    """Raise [`MissingDependencyError`][diffit_toolkit.optional.MissingDependencyError] (``<purpose>
    needs <name>, which is not installed:
    pip install ...``) unless ``name`` is installed."""
    if missing(name) is not None:
        raise MissingDependencyError(
            f"{purpose} needs {name}, which is not installed: pip install 'diffit-toolkit[{OPTIONAL[name][1]}]'")
