"""One string-keyed registry per plugin kind, held by pluggy, filled through a public decorator.

A *plugin* is anything a recipe can name: a conditioning mechanism, a backbone, an attention
backend, a time embedding (more kinds come with later features; :class:`Registry` is generic).
Built-in plugins live in the top-level ``plugins/`` folder (installed as ``diffit_plugins``) and
reach the registry exactly like a third party's: through the ``diffit_toolkit.plugins``
entry-point group, whose modules call the public ``register_*`` functions when imported.

User code registers the same way, with a decorator or a plain call::

    from diffit_toolkit import register_conditioning

    @register_conditioning("my_mechanism")
    class MyMechanism(ConditioningMechanism): ...

    register_conditioning("other_name", MyMechanism)   # plain call

Every error is one line that names the plugin: a duplicate name, an unknown name (with a
"did you mean"), an installed plugin whose import raises (recorded, warned once; the rest keep
working), a plugin whose constructor raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import importlib
import importlib.metadata as md
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import pluggy

from diffit_toolkit import hookspecs
from diffit_toolkit.hookspecs import PROJECT, hookimpl

ENTRY_POINT_GROUP = "diffit_toolkit.plugins"
DISTRIBUTION = "diffit-toolkit"
BUILTIN_MODULE = "diffit_plugins"

#: Human-readable label of each known kind, used in messages ("unknown attention backend ...").
KIND_LABELS: dict[str, str] = {
    "conditioning": "conditioning mechanism",
    "backbone": "backbone",
    "attention": "attention backend",
    "time_embedding": "time embedding",
}

T = TypeVar("T")


class PluginError(ValueError):
    """Base class of the registry's one-line errors."""


class DuplicatePluginError(PluginError):
    """A name is registered twice for the same kind."""


class UnknownPluginError(PluginError):
    """A recipe or call names a plugin that is not registered."""


class PluginBuildError(PluginError):
    """A plugin's constructor raised; the message names the plugin and its package."""


@dataclass(frozen=True, eq=False)
class Entry:
    """One registered plugin: its kind, name, the object (usually a class), and its source package."""

    kind: str
    name: str
    obj: Any
    source: str

    @property
    def summary(self) -> str:
        """First sentence of the object's ``description`` or docstring (empty when it has none)."""
        doc = getattr(self.obj, "description", None) or inspect.getdoc(self.obj) or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        match = re.search(r"\.\s+(?=[A-Z])", paragraph)
        return paragraph[: match.start() + 1] if match else paragraph

    @hookimpl
    def diffit_plugin_entry(self, kind: str) -> Entry | None:
        return self if kind == self.kind else None


@dataclass(frozen=True)
class PluginFailure:
    """An installed plugin module that could not be imported."""

    entry_point: str
    source: str
    error: str

    def message(self) -> str:
        return (
            f"plugin '{self.entry_point}' from package '{self.source}' failed to import "
            f"({self.error}); its plugins are unavailable, the others keep working"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@functools.lru_cache(maxsize=1)
def _packages_to_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def _source_of_module(module_name: str) -> str:
    """The installed distribution whose files hold ``module_name``, else the module name itself.

    A top-level name alone is not proof (some wheels ship a stray top-level ``tests`` package),
    so the module's file must lie inside the distribution's install location.
    """
    top = module_name.split(".")[0]
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    for dist_name in _packages_to_distributions().get(top, []):
        try:
            root = Path(md.distribution(dist_name).locate_file(top)).resolve()
        except md.PackageNotFoundError:
            continue
        if path is not None and root in Path(path).resolve().parents:
            return dist_name
    return module_name


_loading_source: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "diffit_loading_source", default=None
)


def _caller_module() -> str:
    """Name of the first module on the stack outside this one (the registering code)."""
    frame = inspect.currentframe()
    try:
        while frame is not None and frame.f_globals.get("__name__") == __name__:
            frame = frame.f_back
        return frame.f_globals.get("__name__", "__main__") if frame else "__main__"
    finally:
        del frame


def _caller_source() -> str:
    """Source package of the code that called a ``register`` function."""
    during_load = _loading_source.get()
    return during_load if during_load is not None else _source_of_module(_caller_module())


#: Every registration made by a module, by module name. A module runs its registrations once
#: (on first import); a plugin system created later replays them when it loads that module's
#: entry point, so every system sees the same plugins.
_registrations_by_module: dict[str, list[Entry]] = {}


class PluginSystem:
    """The pluggy plugin manager and the discovery state behind every :class:`Registry`.

    The process uses one (``current_system()``); tests swap in a fresh one with
    :func:`use_plugin_system` to stay isolated from each other.
    """

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._loading = False

    # -- discovery ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Import every module of the entry-point group once (lazily, on first use)."""
        if self._loaded or self._loading or not self._load_entry_points:
            return
        self._loading = True
        try:
            eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
            own = [ep for ep in eps if ep.dist is not None and ep.dist.name == DISTRIBUTION]
            if not own:  # running from a source tree without installation
                self._import_plugin_module(BUILTIN_MODULE, "builtin", DISTRIBUTION)
            for ep in eps:
                source = ep.dist.name if ep.dist is not None else ep.value
                self._import_plugin_module(ep.value, ep.name, source)
        finally:
            self._loading = False
            self._loaded = True

    def _import_plugin_module(self, target: str, ep_name: str, source: str) -> None:
        module_name, _, attr = target.partition(":")
        token = _loading_source.set(source)
        try:
            if module_name in sys.modules:  # imported before: replay what it registered
                for logged_module, entries in list(_registrations_by_module.items()):
                    if logged_module == module_name or logged_module.startswith(module_name + "."):
                        for entry in entries:
                            self.add(Entry(entry.kind, entry.name, entry.obj, source))
            module = importlib.import_module(module_name)
            if attr:
                functools.reduce(getattr, attr.split("."), module)
        except Exception as exc:  # a broken plugin must not take the others down
            failure = PluginFailure(ep_name, source, _one_line(exc))
            self.failures.append(failure)
            warnings.warn(failure.message(), RuntimeWarning, stacklevel=2)
        finally:
            _loading_source.reset(token)

    # -- entries -------------------------------------------------------------------------------
    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{kind}:{name}"

    def add(self, entry: Entry) -> None:
        key = self._key(entry.kind, entry.name)
        existing = self.pm.get_plugin(key)
        if existing is not None:
            if existing.obj is entry.obj:  # the same module imported twice: nothing to do
                return
            label = KIND_LABELS.get(entry.kind, entry.kind)
            raise DuplicatePluginError(
                f"{label} '{entry.name}' from '{entry.source}' is already registered by "
                f"'{existing.source}'; register it under another name"
            )
        self.pm.register(entry, name=key)

    def remove(self, kind: str, name: str) -> None:
        plugin = self.pm.get_plugin(self._key(kind, name))
        if plugin is not None:
            self.pm.unregister(plugin)

    def entries(self, kind: str) -> list[Entry]:
        self.ensure_loaded()
        found = self.pm.hook.diffit_plugin_entry(kind=kind)
        return sorted(found, key=lambda e: e.name)

    def lookup(self, kind: str, name: str) -> Entry | None:
        self.ensure_loaded()
        return self.pm.get_plugin(self._key(kind, name))


_current = PluginSystem()


def current_system() -> PluginSystem:
    """The plugin system in use by this process."""
    return _current


@contextlib.contextmanager
def use_plugin_system(system: PluginSystem) -> Iterator[PluginSystem]:
    """Temporarily route every registry through ``system`` (for tests and sandboxes)."""
    global _current
    previous, _current = _current, system
    try:
        yield system
    finally:
        _current = previous


class Registry:
    """A string-keyed registry of one plugin kind.

    Args:
        kind: the kind's key, e.g. ``"conditioning"``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.label = KIND_LABELS.get(kind, kind)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r})"

    @overload
    def register(self, name: str | None = None) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str | None, obj: T) -> T: ...

    def register(self, name: str | None = None, obj: Any = None, *, source: str | None = None):
        """Register ``obj`` under ``name``; without ``obj`` return a decorator.

        ``name`` defaults to the object's ``name`` attribute or its ``__name__``. The source
        package is recorded: the distribution whose entry point is being loaded, else the
        package of the calling module.
        """
        src = source or _caller_source()

        def _do(target: T) -> T:
            key = name or getattr(target, "name", None) or getattr(target, "__name__", None)
            if not isinstance(key, str) or not key:
                raise PluginError(f"cannot register {target!r} as a {self.label}: give it a name")
            system = current_system()
            system.ensure_loaded()  # built-ins first, so a clash names the user's plugin
            entry = Entry(self.kind, key, target, src)
            system.add(entry)
            _registrations_by_module.setdefault(_caller_module(), []).append(entry)
            return target

        if obj is not None:
            return _do(obj)
        return _do

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error if it is absent)."""
        current_system().remove(self.kind, name)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return [e.name for e in self.entries()]

    def entries(self) -> list[Entry]:
        """Registered entries (name, object, source), sorted by name."""
        return current_system().entries(self.kind)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and current_system().lookup(self.kind, name) is not None

    def entry(self, name: str) -> Entry:
        """The entry for ``name``; an unknown name raises :class:`UnknownPluginError`."""
        system = current_system()
        found = system.lookup(self.kind, name)
        if found is not None:
            return found
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(names) if names else "none registered"
        broken = "".join(f"; note: {f.message()}" for f in system.failures)
        raise UnknownPluginError(
            f"unknown {self.label} '{name}'{hint} (available: {listing}){broken}"
        )

    def get(self, name: str) -> Any:
        """The registered object for ``name``."""
        return self.entry(name).obj

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the registered object with the arguments; a raising constructor becomes a
        :class:`PluginBuildError` that names the plugin and its package."""
        entry = self.entry(name)
        try:
            return entry.obj(*args, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginBuildError(
                f"building {self.label} '{name}' (from '{entry.source}') failed: {_one_line(exc)}"
            ) from exc


conditioning = Registry("conditioning")
backbones = Registry("backbone")
attention_backends = Registry("attention")
time_embeddings = Registry("time_embedding")

_REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (conditioning, backbones, attention_backends, time_embeddings)
}


def get_registry(kind: str) -> Registry:
    """The registry of ``kind``, created on first use for kinds added by later features."""
    if kind not in _REGISTRIES:
        _REGISTRIES[kind] = Registry(kind)
    return _REGISTRIES[kind]


def all_registries() -> list[Registry]:
    """Every registry created so far (the built-in kinds first)."""
    return list(_REGISTRIES.values())


def plugin_failures() -> list[PluginFailure]:
    """Installed plugin modules whose import raised."""
    current_system().ensure_loaded()
    return list(current_system().failures)


def register_conditioning(name: str | None = None, obj: Any = None):
    """Register a conditioning mechanism (a :class:`~diffit_toolkit.nn.mechanism.ConditioningMechanism`
    subclass); works as ``@register_conditioning("name")`` and as ``register_conditioning("name", cls)``."""
    return conditioning.register(name, obj, source=_caller_source())


def register_backbone(name: str | None = None, obj: Any = None):
    """Register a backbone factory (decorator or plain call)."""
    return backbones.register(name, obj, source=_caller_source())


def register_attention_backend(name: str | None = None, obj: Any = None):
    """Register an :class:`~diffit_toolkit.nn.attention.AttentionBackend` (decorator or plain call)."""
    return attention_backends.register(name, obj, source=_caller_source())


def register_time_embedding(name: str | None = None, obj: Any = None):
    """Register a time-embedding module class (decorator or plain call)."""
    return time_embeddings.register(name, obj, source=_caller_source())

