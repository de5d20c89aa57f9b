"""The pluggy hook specifications of diffit-toolkit (all hooks in one place, prefixed ``diffit_``).

Every registered plugin (a conditioning mechanism, a backbone, an attention backend, ...) is held
by pluggy as a small plugin object that implements :func:`diffit_plugin_entry`. Pluggy is used to
*discover and hold* plugins; nothing calls a hook per training step: a recipe resolves a name to a
plain class at build time, so ``torch.compile`` never sees a hook call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

PROJECT = "diffit_toolkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:  # pragma: no cover
    from diffit_toolkit.registry import Entry


@hookspec
def diffit_plugin_entry(kind: str) -> Entry | None:
    """Return this plugin's registry entry if it is of ``kind``, else ``None``.

    Implemented by the registry's own entry objects; listing a kind collects the non-``None``
    results of all plugins.
    """
