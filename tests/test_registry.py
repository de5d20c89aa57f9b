"""The registry: public registration, entry-point discovery, one-line errors naming the plugin."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffit_toolkit import (
    BlockSpec,
    ConditioningMechanism,
    DiffiTBlock,
    DuplicatePluginError,
    Injection,
    PluginBuildError,
    UnknownPluginError,
    register_conditioning,
)
from diffit_toolkit.registry import PluginSystem, attention_backends, conditioning, plugin_failures, use_plugin_system

BUILTIN_MECHANISMS = {"tmsa", "window_tmsa", "adaln_zero", "relative_bias", "mlp", "separate_token", "additive"}
BUILTIN_BACKENDS = {"math", "sdpa", "flex", "xformers"}
SPEC = BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(4, 4), rel_pos_bias=True)


class _Scale(ConditioningMechanism):
    """Test mechanism: the token, projected, scales the MLP input."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__(spec)
        self.proj = torch.nn.Linear(spec.cond_dim, spec.dim)

    def forward(self, c):
        return Injection(scale_mlp=self.proj(c)[:, None])


def test_builtins_are_registered_from_the_distribution():
    entries = {e.name: e for e in conditioning.entries()}
    assert BUILTIN_MECHANISMS <= set(entries)
    assert {entries[n].source for n in BUILTIN_MECHANISMS} == {"diffit-toolkit"}
    assert BUILTIN_BACKENDS <= set(attention_backends.names())


def test_register_as_decorator_and_plain_call_then_build_by_name(plugin_system):
    decorated = register_conditioning("scale_mlp")(_Scale)
    assert decorated is _Scale  # the decorator hands the class back
    register_conditioning("scale_mlp_again", _Scale)
    for name in ("scale_mlp", "scale_mlp_again"):
        block = DiffiTBlock(SPEC, name)
        assert isinstance(block.cond, _Scale)
        assert block(torch.randn(2, 16, 16), torch.randn(2, 8)).shape == (2, 16, 16)
    entry = conditioning.entry("scale_mlp")
    assert entry.source == __name__  # user code outside a distribution: the module is the source
    assert entry.summary == "Test mechanism: the token, projected, scales the MLP input."


def test_registering_in_one_system_does_not_leak(plugin_system):
    register_conditioning("only_here", _Scale)
    with use_plugin_system(PluginSystem()):
        assert "only_here" not in conditioning
    assert "only_here" in conditioning


def test_duplicate_name_is_a_one_line_error_naming_both_sources(plugin_system):
    with pytest.raises(DuplicatePluginError) as err:
        register_conditioning("tmsa", _Scale)
    message = str(err.value)
    assert "\n" not in message
    assert "'tmsa'" in message and "diffit-toolkit" in message and __name__ in message


def test_registering_the_same_object_twice_is_harmless(plugin_system):
    register_conditioning("twice", _Scale)
    register_conditioning("twice", _Scale)
    assert conditioning.get("twice") is _Scale


def test_unknown_name_suggests_the_closest(plugin_system):
    with pytest.raises(UnknownPluginError) as err:
        DiffiTBlock(SPEC, "tmas")
    message = str(err.value)
    assert "\n" not in message
    assert "unknown conditioning mechanism 'tmas'" in message
    assert "did you mean 'tmsa'?" in message
    with pytest.raises(UnknownPluginError, match="unknown attention backend 'flash3'"):
        attention_backends.get("flash3")


def test_unknown_name_without_close_match_lists_available(plugin_system):
    with pytest.raises(UnknownPluginError) as err:
        conditioning.get("zzzzzz")
    assert "did you mean" not in str(err.value)
    assert "available: " in str(err.value) and "adaln_zero" in str(err.value)


def test_a_raising_constructor_is_named(plugin_system):
    @register_conditioning("explodes")
    class Explodes(ConditioningMechanism):
        def __init__(self, spec):
            raise RuntimeError("boom\nsecond line")

        def forward(self, c):  # pragma: no cover - never built
            return Injection()

    with pytest.raises(PluginBuildError) as err:
        DiffiTBlock(SPEC, "explodes")
    assert str(err.value) == f"building conditioning mechanism 'explodes' (from '{__name__}') failed: RuntimeError: boom"


def _fake_distribution(root, dist: str, module: str, body: str, ep_name: str) -> None:
    """Write an installed-looking distribution (dist-info with an entry point) under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[diffit_toolkit.plugins]\n{ep_name} = {module}\n")
    (info / "RECORD").write_text("")


GOOD_PLUGIN = """
    from torch import nn
    from diffit_toolkit import ConditioningMechanism, Injection, register_conditioning

    @register_conditioning("fake_gate")
    class FakeGate(ConditioningMechanism):
        '''Gates the attention branch with a projection of the token.'''

        def __init__(self, spec):
            super().__init__(spec)
            self.gate = nn.Linear(spec.cond_dim, spec.dim)

        def forward(self, c):
            return Injection(gate_attn=self.gate(c)[:, None])
"""


def test_installed_distribution_entry_point_is_discovered(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "fake-diffit-plugin", "fake_diffit_plugin", GOOD_PLUGIN, "fake")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_diffit_plugin", raising=False)
    with use_plugin_system(PluginSystem()):
        entry = conditioning.entry("fake_gate")
        assert entry.source == "fake-diffit-plugin"
        block = DiffiTBlock(SPEC, "fake_gate")
        assert block(torch.randn(1, 16, 16), torch.randn(1, 8)).shape == (1, 16, 16)
        assert "tmsa" in conditioning  # built-ins still there


def test_plugin_whose_import_raises_is_named_and_the_rest_keep_working(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken-diffit-plugin", "broken_diffit_plugin", "raise ImportError('needs libfoo')\n", "broken")
    _fake_distribution(tmp_path, "fake-diffit-plugin", "fake_diffit_plugin", GOOD_PLUGIN, "fake")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("broken_diffit_plugin", "fake_diffit_plugin"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with use_plugin_system(PluginSystem()):
        with pytest.warns(RuntimeWarning, match="plugin 'broken' from package 'broken-diffit-plugin' failed to import"):
            names = conditioning.names()
        assert {"fake_gate", "tmsa"} <= set(names)
        (failure,) = plugin_failures()
        assert failure.error == "ImportError: needs libfoo"
        assert "\n" not in failure.message()
        with pytest.raises(UnknownPluginError, match="broken-diffit-plugin"):
            conditioning.get("from_the_broken_one")


HOOK_PLUGIN = """
    from torch import nn
    from diffit_toolkit import ConditioningMechanism, Injection
    from diffit_toolkit.hookspecs import hookimpl

    class HookGate(ConditioningMechanism):
        '''Gates the MLP branch with a projection of the token.'''

        def __init__(self, spec):
            super().__init__(spec)
            self.gate = nn.Linear(spec.cond_dim, spec.dim)

        def forward(self, c):
            return Injection(gate_mlp=self.gate(c)[:, None])

    @hookimpl
    def diffit_register(registrar):
        registrar.add("conditioning", "hook_gate", HookGate)
"""


def test_a_hook_plugin_registers_in_every_fresh_system(tmp_path, monkeypatch):
    # an installed package implementing the hook: loaded through pluggy, registered anew per system
    _fake_distribution(tmp_path, "hook-diffit-plugin", "hook_diffit_plugin", HOOK_PLUGIN, "hooked")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hook_diffit_plugin", raising=False)
    for _ in range(2):  # the module is imported once; each system still gets its entries
        with use_plugin_system(PluginSystem()) as system:
            assert conditioning.entry("hook_gate").source == "hook-diffit-plugin"
            assert system.pm.get_plugin("hooked") is sys.modules["hook_diffit_plugin"]
            assert "tmsa" in conditioning
            system.pm.check_pending()  # every hook implementation matches a spec


def test_a_user_module_by_path_and_by_environment(tmp_path, monkeypatch):
    from diffit_toolkit.registry import PLUGINS_ENV, PluginError

    path = tmp_path / "my_gates.py"
    path.write_text(textwrap.dedent(HOOK_PLUGIN))
    monkeypatch.delitem(sys.modules, "my_gates", raising=False)
    with use_plugin_system(PluginSystem()) as system:
        system.load_module(str(path))
        assert conditioning.entry("hook_gate").source == "my_gates"
    monkeypatch.setenv(PLUGINS_ENV, str(path))
    with use_plugin_system(PluginSystem()):
        assert "hook_gate" in conditioning
    monkeypatch.setenv(PLUGINS_ENV, "no_such_module_here")
    with use_plugin_system(PluginSystem()):
        with pytest.raises(PluginError, match="plugin module 'no_such_module_here' failed to import"):
            conditioning.names()


def test_decorated_plugins_land_in_plain_tables(plugin_system):
    register_conditioning("held", _Scale)
    assert plugin_system.tables["conditioning"]["held"].obj is _Scale
    plugin_system.pm.check_pending()


# -- modules named in DIFFIT_TOOLKIT_PLUGINS: their errors name the module and the variable ----------

ENV_BROKEN = "import no_such_dependency_of_this_plugin\n"
ENV_CLASH_DECORATOR = """
    from diffit_toolkit.registry import register_process

    @register_process("gaussian")
    class Shadow:
        '''A process that takes a built-in name.'''
"""
ENV_CLASH_HOOK = """
    from diffit_toolkit.hookspecs import hookimpl

    @hookimpl
    def diffit_register(registrar):
        registrar.add("conditioning", "tmsa", object)
"""


def _cli(env_plugins: str, *args: str):
    import os
    import subprocess

    env = {**os.environ, "DIFFIT_TOOLKIT_PLUGINS": env_plugins, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffit_toolkit", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_env_plugin_errors_name_the_module_and_the_variable_in_every_command(tmp_path):
    """Real modules in DIFFIT_TOOLKIT_PLUGINS, real processes: a module whose import fails, one whose
    decorator and one whose hook takes a built-in name. Every command (one that reads a recipe,
    one that lists plugins, one that builds a backbone) stops with exit 2 and the module's line,
    not a recipe key it has nothing to do with, nor a traceback."""
    from diffit_toolkit.registry import PLUGINS_ENV

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    cases = {
        "env_broken_probe.py": (ENV_BROKEN, "failed to import (ModuleNotFoundError: No module named "
                                            "'no_such_dependency_of_this_plugin'); fix it or drop it from "
                                            f"{PLUGINS_ENV}"),
        "env_clash_probe.py": (ENV_CLASH_DECORATOR, f"(named in {PLUGINS_ENV}) registers diffusion process "
                                                    "'gaussian', which 'diffit-toolkit' already registers; rename it "
                                                    f"in the module or drop the module from {PLUGINS_ENV}"),
        "env_hook_clash_probe.py": (ENV_CLASH_HOOK, f"(named in {PLUGINS_ENV}) registers conditioning mechanism "
                                                    "'tmsa', which 'diffit-toolkit' already registers; rename it in the "
                                                    f"module or drop the module from {PLUGINS_ENV}"),
    }
    commands = {"env_broken_probe.py": ["recipe", "validate", str(recipe)],
                "env_clash_probe.py": ["plugins"], "env_hook_clash_probe.py": ["model-info", "-b", "dit"]}
    for name, (body, expected) in cases.items():
        module = tmp_path / name
        module.write_text(textwrap.dedent(body))
        out = _cli(str(module), *commands[name])
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert lines == [f"error: plugin module '{module}' {expected}"], (name, lines)
        assert "diffusion.process" not in lines[0] and "Traceback" not in out.stderr


def test_env_plugin_error_is_not_a_recipe_key_error_and_stays_raised(tmp_path, monkeypatch):
    """In a script (no CLI): building a recipe's process with a broken module in the variable
    raises the module's line, and every later lookup raises it again (no silent run without it)."""
    from diffit_toolkit.build import build_process
    from diffit_toolkit.recipe import Recipe
    from diffit_toolkit.registry import PLUGINS_ENV, PluginLoadError, processes

    module = tmp_path / "env_broken_script_probe.py"
    module.write_text(ENV_BROKEN)
    monkeypatch.setenv(PLUGINS_ENV, str(module))
    with use_plugin_system(PluginSystem()):
        with pytest.raises(ValueError) as err:
            build_process(Recipe())
        assert str(err.value).startswith(f"plugin module '{module}' failed to import")
        assert PLUGINS_ENV in str(err.value) and "diffusion.process" not in str(err.value)
        with pytest.raises(PluginLoadError, match=f"drop it from {PLUGINS_ENV}"):
            processes.get("gaussian")


def test_a_plugins_own_exception_stays_the_cause_of_the_recipe_error(plugin_system):
    """Never swallowed (``from None``): the one line is the recipe's, the plugin's own exception its
    cause, which ``--traceback`` prints down to the plugin's line."""
    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.recipe import RecipeError

    class Broken(_Scale):
        def __init__(self, spec: BlockSpec) -> None:
            raise ZeroDivisionError("the plugin author's bug")

    register_conditioning("broken_cause_probe", Broken)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError, match="the plugin author's bug") as err:
        load_recipe(recipe, ["model.mechanism=broken_cause_probe"])
    assert isinstance(err.value.__cause__, PluginBuildError)  # raised from it, not from None
    assert isinstance(err.value.__cause__.__cause__, ZeroDivisionError)
