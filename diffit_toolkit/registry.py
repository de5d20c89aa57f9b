"""One string-keyed registry per plugin kind: plain dicts, filled by pluggy hooks and decorators.

A *plugin* is anything a recipe can name: a conditioning mechanism, a backbone, an attention
backend, a time embedding, a diffusion process, a sampler, a dataset kind. Plugins reach the
registries in two ways, both public:

* **plugin modules** implement the [`diffit_register`][diffit_toolkit.hookspecs.diffit_register] hook. The
  built-ins (``plugins/``, installed as ``diffit_plugins``) and installed packages are found
  through the ``diffit_toolkit.plugins`` entry-point group (pluggy's
  ``load_setuptools_entrypoints``, as pytest finds its plugins); a module named with
  ``diffit-toolkit -p MODULE`` or in ``DIFFIT_TOOLKIT_PLUGINS`` is loaded the same way.
* **decorators** (``register_conditioning`` and friends) for scripts and notebooks:

  ```python
  from diffit_toolkit import register_conditioning

  @register_conditioning("my_mechanism")
  class MyMechanism(ConditioningMechanism): ...

  register_conditioning("other_name", MyMechanism)   # plain call
  ```

Every error is one line that names the plugin: a duplicate name, an unknown name (with a
"did you mean"), an installed plugin whose import raises (recorded, warned once; the rest keep
working), a plugin whose constructor raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.metadata as md
import importlib.util
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar, overload

import pluggy

from diffit_toolkit import hookspecs
from diffit_toolkit.errors import UsageError, did_you_mean, one_line
from diffit_toolkit.hookspecs import PROJECT

ENTRY_POINT_GROUP = "diffit_toolkit.plugins"
DISTRIBUTION = "diffit-toolkit"
BUILTIN_MODULE = "diffit_plugins"
#: Comma-separated plugin modules (names or ``.py`` paths) loaded into every plugin system,
#: like pytest's ``PYTEST_PLUGINS``; ``diffit-toolkit -p`` sets it for the processes it starts.
PLUGINS_ENV = "DIFFIT_TOOLKIT_PLUGINS"

#: Human-readable label of each kind, used in messages ("unknown attention backend ...").
KIND_LABELS: dict[str, str] = {
    "conditioning": "conditioning mechanism",
    "backbone": "backbone",
    "attention": "attention backend",
    "time_embedding": "time embedding",
    "process": "diffusion process",
    "sampler": "sampler",
    "dataset": "dataset kind",
}

T = TypeVar("T")


class PluginError(UsageError, ValueError):
    """Base class of the registry's one-line errors."""


class DuplicatePluginError(PluginError):
    """A name is registered twice for the same kind."""

    #: What clashed: the kind's label, the name, and the source that registered it first.
    label: str = ""
    name: str = ""
    existing: str = ""


class PluginLoadError(PluginError):
    """A plugin module named with ``-p`` or in ``DIFFIT_TOOLKIT_PLUGINS`` could not be loaded (its
    import raised, or it registers a name already taken); the message names the module and where
    it was named."""


class PluginModuleClashError(PluginLoadError, DuplicatePluginError):
    """A plugin module named with ``-p`` or in ``DIFFIT_TOOLKIT_PLUGINS`` registers a name that
    another plugin already has."""


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


class Registrar:
    """What a [`diffit_register`][diffit_toolkit.hookspecs.diffit_register] hook receives: ``add`` records
    entries in one plugin system, attributed to the package the hook's module came from."""

    def __init__(self, system: PluginSystem, source: str) -> None:
        self._system = system
        self.source = source

    def add(self, kind: str, name: str, obj: Any) -> Any:
        """Register ``obj`` as the ``kind`` plugin ``name``; returns ``obj``."""
        self._system.add(Entry(kind, name, obj, self.source))
        return obj


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


#: The package whose plugin module is being imported (decorators called during that import
#: are attributed to it).
_loading_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("diffit_loading_source", default=None)


def _import_user_module(target: str) -> ModuleType:
    """Import a module by dotted name, or a ``.py`` file by path (as module ``<stem>``)."""
    path = Path(target)
    if target.endswith(".py"):
        if not path.is_file():
            raise PluginError(f"plugin file '{target}' does not exist: check the path")
        name = path.stem
        loaded = sys.modules.get(name)
        if loaded is not None:
            where = getattr(loaded, "__file__", None)
            if where is None or Path(where).resolve() != path.resolve():  # the same file loads again
                raise PluginError(
                    f"plugin file '{target}' is named like the module '{name}' already loaded "
                    f"(from {where or 'the installed packages'}); rename the file")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a spec
            raise PluginError(f"plugin file '{target}' cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    return importlib.import_module(target)


class PluginSystem:
    """The pluggy plugin manager and the registries' tables.

    The process uses one (``current_system()``); tests swap in a fresh one with
    [`use_plugin_system`][diffit_toolkit.registry.use_plugin_system] to stay isolated from each other.
    """

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.tables: dict[str, dict[str, Entry]] = {}
        self.failures: list[PluginFailure] = []
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._loading = False
        #: The error of a module named in ``DIFFIT_TOOLKIT_PLUGINS`` that could not be loaded:
        #: raised by every later lookup too, so no lookup quietly goes on without that module.
        self._env_error: PluginLoadError | None = None

    # -- discovery ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Load the built-ins, every installed entry point and ``DIFFIT_TOOLKIT_PLUGINS`` once
        (lazily, on first use).

        Raises:
            PluginLoadError: one line naming the module of ``DIFFIT_TOOLKIT_PLUGINS`` that could not
                be loaded (again on every later call).
        """
        if self._env_error is not None:
            raise self._env_error
        if self._loaded or self._loading or not self._load_entry_points:
            return
        self._loading = True
        try:
            eps = list(md.entry_points(group=ENTRY_POINT_GROUP))
            if not any(ep.dist is not None and ep.dist.name == DISTRIBUTION for ep in eps):
                self.load_module(BUILTIN_MODULE, source=DISTRIBUTION)  # a source tree, not installed
            for ep in eps:
                self._load_entry_point(ep)
            for target in filter(None, (t.strip() for t in os.environ.get(PLUGINS_ENV, "").split(","))):
                try:
                    self.load_module(target, origin=PLUGINS_ENV)
                except PluginLoadError as exc:
                    self._env_error = exc
                    raise
        finally:
            self._loading = False
            self._loaded = True

    def _load_entry_point(self, ep: md.EntryPoint) -> None:
        source = ep.dist.name if ep.dist is not None else ep.value
        token = _loading_source.set(source)
        try:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            failure = PluginFailure(ep.name, source, one_line(exc))
            self.failures.append(failure)
            warnings.warn(failure.message(), RuntimeWarning, stacklevel=3)
            return
        finally:
            _loading_source.reset(token)
        plugin = self.pm.get_plugin(ep.name)
        if plugin is not None:
            self._call_register(plugin, source)

    def load_module(self, target: str, source: str | None = None, origin: str = f"-p / {PLUGINS_ENV}") -> ModuleType:
        """Import a plugin module (dotted name or ``.py`` path), register it with pluggy and run
        its ``diffit_register`` hook; decorators it calls while importing register too.

        Args:
            origin: where the module was named (``-p``, ``DIFFIT_TOOLKIT_PLUGINS``), for messages.

        Raises:
            PluginLoadError: one line naming the module and ``origin`` when it cannot be imported
                or registers a name that is already taken
                ([`PluginModuleClashError`][diffit_toolkit.registry.PluginModuleClashError]).
        """
        token = _loading_source.set(source or (Path(target).stem if target.endswith(".py") else target))
        try:
            module = _import_user_module(target)
        except DuplicatePluginError as exc:  # a decorator in the module body
            raise _clash(target, origin, exc) from exc
        except PluginLoadError:
            raise
        except PluginError as exc:  # a missing file, a name of a loaded module
            raise PluginLoadError(f"{origin}: {exc}") from exc
        except SystemExit as exc:  # a plugin that exits while importing must not end the command as a success
            raise PluginLoadError(f"plugin module '{target}' called sys.exit({exc.code!r}) while importing; a plugin "
                                  f"module must only define and register; fix it or drop it from {origin}") from exc
        except Exception as exc:
            raise PluginLoadError(f"plugin module '{target}' failed to import ({one_line(exc)}); fix it or drop it "
                                  f"from {origin}") from exc
        finally:
            _loading_source.reset(token)
        if self.pm.is_registered(module):
            return module
        self.pm.register(module, name=module.__name__)
        try:
            self._call_register(module, source or _source_of_module(module.__name__))
        except DuplicatePluginError as exc:  # its diffit_register hook
            raise _clash(target, origin, exc) from exc
        return module

    def _call_register(self, plugin: object, source: str) -> None:
        # through pluggy, on this plugin alone: what it registers is attributed to its source
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        self.pm.subset_hook_caller("diffit_register", remove_plugins=others)(registrar=Registrar(self, source))

    # -- entries -------------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        table = self.tables.setdefault(entry.kind, {})
        existing = table.get(entry.name)
        if existing is not None:
            if existing.obj is entry.obj:  # the same module imported twice: nothing to do
                return
            label = KIND_LABELS.get(entry.kind, entry.kind)
            error = DuplicatePluginError(
                f"{label} '{entry.name}' from '{entry.source}' is already registered by "
                f"'{existing.source}'; register it under another name"
            )
            error.label, error.name, error.existing = label, entry.name, existing.source
            raise error
        table[entry.name] = entry

    def remove(self, kind: str, name: str) -> None:
        self.tables.get(kind, {}).pop(name, None)

    def entries(self, kind: str) -> list[Entry]:
        self.ensure_loaded()
        return sorted(self.tables.get(kind, {}).values(), key=lambda e: e.name)

    def lookup(self, kind: str, name: str) -> Entry | None:
        self.ensure_loaded()
        return self.tables.get(kind, {}).get(name)


def _clash(target: str, origin: str, exc: DuplicatePluginError) -> PluginModuleClashError:
    """The one line for a plugin module (named in ``origin``) that registers a taken name."""
    if not exc.name:  # pragma: no cover - every DuplicatePluginError of PluginSystem.add has them
        return PluginModuleClashError(f"plugin module '{target}' (named in {origin}): {exc}")
    error = PluginModuleClashError(
        f"plugin module '{target}' (named in {origin}) registers {exc.label} '{exc.name}', which "
        f"'{exc.existing}' already registers; rename it in the module or drop the module from {origin}")
    error.label, error.name, error.existing = exc.label, exc.name, exc.existing
    return error


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


def load_plugin_modules(targets: list[str]) -> None:
    """Load user plugin modules (dotted names or ``.py`` paths) into the current system and into
    every process this one starts (through ``DIFFIT_TOOLKIT_PLUGINS``)."""
    system = current_system()
    if targets or os.environ.get(PLUGINS_ENV, "").strip():
        # otherwise the registries load the installed plugins on first use; a module named in
        # DIFFIT_TOOLKIT_PLUGINS that cannot load fails here, before any command uses a registry
        system.ensure_loaded()
    for target in targets:
        system.load_module(target, origin="-p")
    if targets:
        known = [t for t in os.environ.get(PLUGINS_ENV, "").split(",") if t.strip()]
        os.environ[PLUGINS_ENV] = ",".join(dict.fromkeys([*known, *targets]))


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
        package is recorded: the package whose plugin module is being loaded, else the
        distribution (or module) that defines ``obj``.
        """

        def _do(target: T) -> T:
            key = name or getattr(target, "name", None) or getattr(target, "__name__", None)
            if not isinstance(key, str) or not key:
                raise PluginError(f"cannot register {target!r} as a {self.label}: give it a name")
            src = source or _loading_source.get() or _source_of_module(getattr(target, "__module__", "__main__"))
            system = current_system()
            system.ensure_loaded()  # built-ins first, so a clash names the user's plugin
            system.add(Entry(self.kind, key, target, src))
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
        """The entry for ``name``; an unknown name raises
        [`UnknownPluginError`][diffit_toolkit.registry.UnknownPluginError]."""
        system = current_system()
        found = system.lookup(self.kind, name)
        if found is not None:
            return found
        names = self.names()
        listing = ", ".join(names) if names else "none registered"
        broken = "".join(f"; note: {f.message()}" for f in system.failures)
        raise UnknownPluginError(f"unknown {self.label} '{name}'{did_you_mean(name, names)} (available: {listing}){broken}")

    def get(self, name: str) -> Any:
        """The registered object for ``name``."""
        return self.entry(name).obj

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the registered object with the arguments; a raising constructor becomes a
        [`PluginBuildError`][diffit_toolkit.registry.PluginBuildError] that names the plugin and its
        package."""
        entry = self.entry(name)
        try:
            return entry.obj(*args, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginBuildError(f"building {self.label} '{name}' (from '{entry.source}') failed: {one_line(exc)}") from exc


conditioning = Registry("conditioning")
backbones = Registry("backbone")
attention_backends = Registry("attention")
time_embeddings = Registry("time_embedding")
processes = Registry("process")
samplers = Registry("sampler")
datasets = Registry("dataset")

_REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (conditioning, backbones, attention_backends, time_embeddings, processes, samplers, datasets)
}


def get_registry(kind: str) -> Registry:
    """The registry of ``kind``, created on first use for kinds added by plugins."""
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


def _decorator(registry: Registry, doc: str):
    def register(name: str | None = None, obj: Any = None):
        return registry.register(name, obj)

    register.__doc__ = doc
    return register


register_conditioning = _decorator(conditioning, """Register a conditioning mechanism (a
``ConditioningMechanism`` subclass); works as
``@register_conditioning("name")`` and as ``register_conditioning("name", cls)``.""")
register_backbone = _decorator(backbones, "Register a backbone factory ``(preset, **options) -> nn.Module`` (decorator or plain call).")
register_attention_backend = _decorator(attention_backends, "Register an ``AttentionBackend`` (decorator or plain call).")
register_time_embedding = _decorator(time_embeddings, "Register a time-embedding module class (decorator or plain call).")
register_process = _decorator(processes, "Register a diffusion process class (a ``Process`` subclass).")
register_sampler = _decorator(samplers, "Register a sampler (a ``Sampler``) under ``'<process>.<name>'``.")
register_dataset = _decorator(datasets, "Register a dataset kind (a ``DatasetKind``).")
