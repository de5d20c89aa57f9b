"""The pluggy hook specifications of diffit-toolkit (all hooks in one place, prefixed ``diffit_``).

A *plugin module* (the built-ins in ``diffit_plugins``, an installed package named in the
``diffit_toolkit.plugins`` entry-point group, or a module passed with ``diffit-toolkit -p``)
implements these hooks with `hookimpl`, the way a pytest plugin implements ``pytest_*``
hooks:

```python
from diffit_toolkit.hookspecs import hookimpl

@hookimpl
def diffit_register(registrar):
    registrar.add("conditioning", "my_mechanism", MyMechanism)
```

Hooks run when a plugin system loads (once per process, and once per isolated system in tests);
nothing calls a hook per training step: a recipe resolves a name to a plain class at build time,
so ``torch.compile`` never sees a hook call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

PROJECT = "diffit_toolkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:  # pragma: no cover
    from diffit_toolkit.registry import Registrar


@hookspec
def diffit_register(registrar: Registrar) -> None:
    """Register this plugin module's entries with ``registrar.add(kind, name, obj)``.

    ``kind`` is one of the registry kinds (``conditioning``, ``backbone``, ``attention``,
    ``time_embedding``, ``process``, ``sampler``, ``dataset``); the entries are recorded with the
    package the module came from.
    """
