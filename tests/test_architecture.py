"""The shape of the code: one-way layers, one build path, registries for every recipe string."""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffit_toolkit.build import build_process, validate_recipe
from diffit_toolkit.cli import app
from diffit_toolkit.recipe import RECIPES_DIR, SampleSection
from diffit_toolkit.registry import PLUGINS_ENV, conditioning

PACKAGE = Path(__file__).resolve().parents[1] / "diffit_toolkit"

#: Layers from the bottom up: a module may import its own layer and the ones below, never above.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "hookspecs", "registry", "optional"),
    ("nn", "diffusion", "data"),
    ("sampling",),
    ("backbones", "process", "recipe"),
    ("runs",),
    ("interop", "build"),
    ("inference",),
    ("train",),
    ("eval", "bench", "testing"),
    ("commands",),
    ("cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "diffit_toolkit" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``diffit_toolkit.*`` / ``diffit_plugins`` module a file imports, also inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                                                     if node.module == "diffit_toolkit"]
    return found


def test_no_module_imports_a_layer_above_it_or_a_plugin():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        area = rel.parts[1] if len(rel.parts) > 1 else None
        if area is None or area == "__init__":  # the package root re-exports the public API
            continue
        area = Path(area).stem
        assert area in RANK, f"{rel}: put the new area '{area}' into LAYERS"
        for line, module in _imports(path):
            if module.split(".")[0] == "diffit_plugins":
                violations.append(f"{rel}:{line} imports the plugin module {module}")
            target = _area(module)
            if target is not None and target in RANK and RANK[target] > RANK[area]:
                violations.append(f"{rel}:{line} ({area}) imports {module} ({target}, a layer above)")
    assert not violations, "\n".join(violations)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from diffit_toolkit.train import train\n")
    assert [m for _, m in _imports(bad)] == ["diffit_toolkit.train"]


# -- validation is building: validate and train agree -------------------------------------------


def _quickstart_without_input_size(tmp_path: Path, **model) -> Path:
    raw = yaml.safe_load((RECIPES_DIR / "quickstart.yaml").read_text())
    del raw["model"]["input_size"]  # taken from the data (8x8 digits -> a 4x4 token grid)
    raw["model"].update(model)
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_validate_and_train_agree_on_a_window_that_does_not_fit_the_data(tmp_path):
    recipe = str(_quickstart_without_input_size(tmp_path, window=8))
    runner = CliRunner()
    validated = runner.invoke(app, ["recipe", "validate", recipe], env={"COLUMNS": "300"})
    trained = runner.invoke(app, ["train", recipe, "--set", "train.max_steps=1", "--device", "cpu", "--no-progress"],
                            env={"COLUMNS": "300"})
    for result in (validated, trained):
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert "token grid 4x4 is not divisible by window 8x8" in result.output
    assert not (tmp_path / "run").exists()  # nothing started
    ok = runner.invoke(app, ["recipe", "validate", str(_quickstart_without_input_size(tmp_path, window=2))])
    assert ok.exit_code == 0 and "ok" in ok.output


def test_validate_says_which_checks_it_skipped_without_the_data(tmp_path):
    raw = {"model": {"backbone": "latent_diffit", "preset": "S/2"}, "diffusion": {"learn_sigma": True},
           "data": {"kind": "latents", "path": str(tmp_path / "not_copied_yet")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["recipe", "validate", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "not checked: data path" in result.output and "not_copied_yet" in result.output


# -- guidance works the same in every process ----------------------------------------------------


class _Recorder(torch.nn.Module):
    """A class-conditional toy denoiser that records the guidance scale applied at each call."""

    null_class = 3

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, y):
        self.calls.append(t[: x.shape[0] // 2].detach().clone())
        return 0.1 * x + (y[:, None, None, None] == self.null_class).to(x.dtype)


@pytest.mark.parametrize(("process", "sampler"), [("gaussian", "ddim"), ("edm", "heun"), ("flow", "euler"), ("flow", "heun")])
def test_guidance_schedule_and_interval_follow_the_noise_level_in_every_process(process, sampler):
    recipe = validate_recipe({"diffusion": {"process": process, "learn_sigma": False},
                              "sample": {"sampler": sampler, "steps": 12, "guidance_scale": 4.0,
                                         "guidance_schedule": "power_cosine", "guidance_interval": [0.2, 0.8]},
                              "model": {"backbone": "latent_diffit", "preset": "S/8"}})
    built = build_process(recipe)
    model = _Recorder()
    settings: SampleSection = recipe.sample
    guided = built.guided(model, settings, null_class=model.null_class)
    levels, scales = [], []
    for t in torch.linspace(0.0, 1.0, 41, dtype=torch.float64):
        t_model = {"gaussian": t * 999, "flow": 1 - t}.get(process)
        if t_model is None:  # EDM: the model sees c_noise of a sigma at that level of the range
            sigma = (0.002 ** (1 / 7) + t * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
            t_model = built.precond.c_noise(sigma)
        level = built.noise_level(t_model.reshape(1)).item()
        levels.append(level)
        scales.append(guided.config.scale_at(t_model.reshape(1)).item())
    levels_t, scales_t = torch.tensor(levels, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64)
    inside = (levels_t >= 0.2) & (levels_t <= 0.8)
    assert inside.any() and (~inside).any()
    assert torch.all(scales_t[~inside] == 1.0)  # the interval is honoured
    expected = 1 + 3.0 * 0.5 * (1 - torch.cos(torch.pi * (1 - levels_t[inside]) ** 4.0))
    torch.testing.assert_close(scales_t[inside], expected)
    assert scales_t[inside].max() - scales_t[inside].min() > 0.5  # a schedule, not a constant
    # and a real sampler run reaches both sides of the interval
    x = built.sample(model, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), settings, torch.Generator().manual_seed(0),
                     null_class=model.null_class)
    assert torch.isfinite(x).all()
    seen = torch.stack([built.noise_level(c[:1]).squeeze() for c in model.calls])
    assert (seen > 0.8).any() and ((seen >= 0.2) & (seen <= 0.8)).any()


# -- user plugins from the command line ----------------------------------------------------------

USER_MODULE = """
    from torch import nn
    from diffit_toolkit import ConditioningMechanism, Injection, register_conditioning

    @register_conditioning("cli_gate")
    class CliGate(ConditioningMechanism):
        '''Gates the attention branch with a projection of the token.'''

        def __init__(self, spec):
            super().__init__(spec)
            self.gate = nn.Linear(spec.cond_dim, spec.dim)

        def forward(self, c):
            return Injection(gate_attn=self.gate(c)[:, None])
"""


def test_dash_p_loads_a_user_module_before_the_recipe_is_read(tmp_path, monkeypatch, plugin_system):
    module = tmp_path / "cli_gates.py"
    module.write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.delitem(sys.modules, "cli_gates", raising=False)
    monkeypatch.setenv(PLUGINS_ENV, "")  # restored afterwards: -p exports what it loaded
    recipe = _quickstart_without_input_size(tmp_path, mechanism="cli_gate")
    runner = CliRunner()
    without = runner.invoke(app, ["recipe", "validate", str(recipe)], env={"COLUMNS": "300"})
    assert without.exit_code == 2 and "unknown conditioning mechanism 'cli_gate'" in without.output
    with_p = runner.invoke(app, ["-p", str(module), "recipe", "validate", str(recipe)], env={"COLUMNS": "300"})
    assert with_p.exit_code == 0, with_p.output
    assert conditioning.entry("cli_gate").source == "cli_gates"
    import os

    assert str(module) in os.environ[PLUGINS_ENV]  # processes it starts (torchrun ranks) load it too
    broken = runner.invoke(app, ["-p", "no_such_plugin_module", "plugins"], env={"COLUMNS": "300"})
    assert broken.exit_code == 2 and "plugin module 'no_such_plugin_module' failed to import" in broken.output


# -- dependencies: what the code imports is declared; optional parts are extras -----------------

def test_every_third_party_import_is_a_declared_dependency_or_a_guarded_extra():
    import importlib.metadata as md
    import re
    import tomllib

    from diffit_toolkit.optional import OPTIONAL

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    name = lambda requirement: re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    declared = {name(r) for r in project["dependencies"]}
    extras = {extra: {name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    distributions = md.packages_distributions()
    undeclared = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "plugins").rglob("*.py")]):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("diffit_toolkit", "diffit_plugins"):
                continue
            dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
            if dists & declared:
                continue
            optional = next((n for n in OPTIONAL if n == top or n in dists), None)
            if optional is not None and OPTIONAL[optional][1] in extras:
                continue
            undeclared.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} ({', '.join(sorted(dists))})")
    assert not undeclared, "\n".join(undeclared)


def test_no_merge_conflict_markers_left_in_the_tree():
    root = PACKAGE.parent
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"}
    folders = ("diffit_toolkit", "plugins", "tests", "docs", "recipes", "scripts", "benchmarks", ".ci")
    files = [p for f in folders if (root / f).is_dir() for p in (root / f).rglob("*")
             if p.is_file() and (p.suffix in suffixes or p.name == "run") and "venv" not in p.parts]
    files += [p for p in root.iterdir() if p.is_file() and p.suffix in suffixes]
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    left = [str(p.relative_to(root)) for p in files if marker.search(p.read_text(errors="ignore"))]
    assert not left, f"merge conflict markers in: {', '.join(left)}"
