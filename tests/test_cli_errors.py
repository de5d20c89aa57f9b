"""One-line errors with the documented exit codes (2: usage, 1: run-time failure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app

RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
WIDE = {"COLUMNS": "300"}


def test_model_info_unknown_backbone_is_a_usage_error():
    out = RUNNER.invoke(app, ["model-info", "-b", "ditt"], env=WIDE)
    assert out.exit_code == 2 and "unknown backbone 'ditt'; did you mean 'dit'?" in out.output
    assert "Traceback" not in out.output
    preset = RUNNER.invoke(app, ["model-info", "-b", "dit", "-p", "XL/3"], env=WIDE)
    assert preset.exit_code == 2 and "unknown preset(s) XL/3" in preset.output


def test_every_toolkit_error_carries_its_exit_code_and_keeps_its_builtin_base():
    from diffit_toolkit.data.image_folder import BadImageError
    from diffit_toolkit.errors import RunFailure, UsageError
    from diffit_toolkit.eval.ablation import AblationStopped
    from diffit_toolkit.eval.inputs import InputError
    from diffit_toolkit.eval.jobs import LauncherError
    from diffit_toolkit.eval.metrics import MissingWeightsError
    from diffit_toolkit.optional import MissingDependencyError
    from diffit_toolkit.recipe import RecipeError
    from diffit_toolkit.registry import (DuplicatePluginError, PluginBuildError, PluginError, PluginLoadError,
                                         PluginModuleClashError, UnknownPluginError)
    from diffit_toolkit.runs import CheckpointError, CheckpointPathError, OutputFolderError, RunFolderError
    from diffit_toolkit.train import TrainingError

    usage = {RecipeError: ValueError, PluginError: ValueError, DuplicatePluginError: ValueError,
             PluginLoadError: ValueError, PluginModuleClashError: ValueError, UnknownPluginError: ValueError,
             PluginBuildError: ValueError, InputError: ValueError, BadImageError: ValueError,
             MissingWeightsError: FileNotFoundError, MissingDependencyError: ImportError,
             CheckpointPathError: CheckpointError, OutputFolderError: RunFolderError}
    failures = {TrainingError: RuntimeError, CheckpointError: RuntimeError, RunFolderError: RuntimeError,
                AblationStopped: RuntimeError, LauncherError: RuntimeError}
    for cls, builtin in usage.items():
        assert issubclass(cls, UsageError) and issubclass(cls, builtin) and cls("x").exit_code == 2, cls
    for cls, builtin in failures.items():
        assert issubclass(cls, RunFailure) and issubclass(cls, builtin) and cls("x").exit_code == 1, cls
        assert not issubclass(cls, UsageError), cls


@pytest.mark.parametrize("error, code", [("CheckpointError", 1), ("CheckpointPathError", 2)])
def test_a_checkpoint_error_exits_alike_in_every_command_that_reads_one(tmp_path, monkeypatch, error, code):
    """A damaged checkpoint is a failure (1), a path that is none a usage error (2): in sample,
    export and eval alike (sample and export used to exit 2 where train exited 1)."""
    import diffit_toolkit.inference.pipeline as pipeline
    import diffit_toolkit.runs as runs

    def refuse(*args, **kwargs):
        raise getattr(runs, error)(f"checkpoint probe: {error}")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    run = str(tmp_path / "run")
    for command in (["sample", run, "--device", "cpu"], ["export", run, str(tmp_path / "out")],
                    ["eval", run, "--device", "cpu"]):
        out = RUNNER.invoke(app, command, env=WIDE)
        assert out.exit_code == code and out.output.strip() == f"error: checkpoint probe: {error}", (command, out.output)


def test_commands_raise_errors_and_one_place_turns_them_into_exit_codes():
    """No command picks an exit code: each raises the toolkit's errors (or marks a block whose plain
    ValueError / OSError is the user's input) and the command group maps them."""
    folder = ROOT / "diffit_toolkit" / "commands"
    for path in folder.glob("*.py"):
        text = path.read_text()
        if path.name != "__init__.py":
            assert "exit_with_error" not in text and "typer.Exit" not in text and "EXIT_" not in text, path.name


def test_model_info_without_a_preset_counts_the_benchmark_canvas_model():
    from diffit_toolkit.build import build_dataset, build_model, data_facts, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "benchmark" / "base.yaml")
    built = build_model(recipe, data_facts(build_dataset(recipe)), device="meta")
    sets = [f"{k}={v}" for k, v in recipe.model.items() if k in ("in_channels", "channels", "num_blocks", "head_dim",
                                                                   "time_dim", "norm_groups", "window")]
    out = RUNNER.invoke(app, ["model-info", "-b", "image_diffit", "-p", "none", "--input-size", "16",
                              "--num-classes", "0", "-m", "tmsa", *[a for s in sets for a in ("--set", s)]], env=WIDE)
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if "(no preset)" in line)
    assert f"{sum(p.numel() for p in built.parameters()) / 1e6:.2f}" in row and "tmsa" in row


def test_convert_of_a_wrong_file_is_a_usage_error(tmp_path):
    out = RUNNER.invoke(app, ["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o.safetensors")], env=WIDE)
    assert out.exit_code == 2 and "does not exist" in out.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("command", [["train", "quickstart"], ["sample", "runs/nothere"], ["eval", "s.npz"],
                                     ["cache-latents", "images", "latents"], ["ablate", "r.yaml"]])
def test_cuda_without_a_gpu_is_one_line(command):
    out = RUNNER.invoke(app, [*command, "--device", "cuda"], env=WIDE)
    assert out.exit_code == 2 and "PyTorch sees no CUDA GPU here" in out.output and "--device cpu" in out.output
    assert "Traceback" not in out.output


def test_unknown_device_name_is_one_line():
    out = RUNNER.invoke(app, ["sample", "runs/nothere", "--device", "gpu0"], env=WIDE)
    assert out.exit_code == 2 and "unknown device 'gpu0': use cpu, cuda or cuda:N" in out.output


def _stop(record: list, name: str):
    def stand_in(*args, device=None, **kwargs):
        record.append((name, str(device)))
        raise ValueError("stopped here")

    return stand_in


@pytest.mark.parametrize("given", [[], ["--device", "cpu"]])
def test_every_model_command_takes_cuda_when_available_unless_told(tmp_path, monkeypatch, given):
    import diffit_toolkit.data.cache as cache
    import diffit_toolkit.eval.ablation as ablation
    import diffit_toolkit.eval.metrics as metrics
    import diffit_toolkit.inference.pipeline as pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU is touched: the stand-ins stop first
    seen: list = []
    monkeypatch.setattr(cache, "cache_latents", _stop(seen, "cache-latents"))
    monkeypatch.setattr(metrics, "inception_extractor", _stop(seen, "eval"))
    monkeypatch.setattr(pipeline, "load_pipeline", _stop(seen, "eval RUN"))
    monkeypatch.setattr(ablation, "run_ablation", _stop(seen, "ablate"))
    (tmp_path / "r.yaml").write_text("name: r\n")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for command in (["cache-latents", str(tmp_path / "images"), str(tmp_path / "latents")],
                    ["eval", str(tmp_path / "s.npz"), "--metric", "inception"], ["eval", str(tmp_path / "run")],
                    ["ablate", str(tmp_path / "r.yaml")]):
        out = RUNNER.invoke(app, [*command, *given], env=WIDE)
        assert out.exit_code == 2 and "stopped here" in out.output, out.output
    expected = "cpu" if given else "cuda"
    assert seen == [("cache-latents", expected), ("eval", expected), ("eval RUN", expected), ("ablate", expected)]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_progress_bar_shows_counts_and_eta_on_a_terminal_only(monkeypatch, enabled):
    import io

    from rich.console import Console

    import diffit_toolkit.commands as commands

    screen = io.StringIO()
    monkeypatch.setattr(commands, "console", Console(file=screen, force_terminal=True, width=120))
    with commands.progress_bar("encoding", enabled=enabled) as update:
        update(2, 8)
        update(8, label="features")
    shown = screen.getvalue()
    if enabled:
        assert "features" in shown and "8/8" in shown and "ETA" in shown
    else:
        assert shown == ""


@pytest.mark.parametrize("command", ["sample", "eval", "cache-latents", "train"])
def test_every_command_with_a_progress_bar_can_turn_it_off(command):
    out = RUNNER.invoke(app, [command, "--help"], env=WIDE)
    assert out.exit_code == 0 and "--no-progress" in out.output


BROKEN_PLUGIN = '''
from torch import nn

from diffit_toolkit import ConditioningMechanism, register_conditioning


def project(dim):
    return nn.Linear(dim, dim * 3 // 0)  # the plugin author's bug


@register_conditioning("broken_traceback_probe")
class Broken(ConditioningMechanism):
    def __init__(self, spec):
        super().__init__(spec)
        self.proj = project(spec.dim)

    def forward(self, c):
        raise NotImplementedError
'''


@pytest.mark.parametrize("switch", ["--traceback", "env"])
def test_traceback_shows_the_plugins_own_stack_behind_the_one_line(tmp_path, switch):
    import subprocess
    import sys

    plugin = tmp_path / "broken_probe.py"
    plugin.write_text(BROKEN_PLUGIN)
    base = [sys.executable, "-m", "diffit_toolkit.cli", "-p", str(plugin)]
    args = ["recipe", "validate", "recipes/quickstart.yaml", "--set", "model.mechanism=broken_traceback_probe"]
    env = {k: v for k, v in os.environ.items() if k != "DIFFIT_TOOLKIT_TRACEBACK"}
    plain = subprocess.run(base + args, capture_output=True, text=True, cwd=ROOT, env=env)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stdout + plain.stderr
    assert len([line for line in plain.stdout.splitlines() if line.startswith("error:")]) == 1
    if switch == "env":
        shown = subprocess.run(base + args, capture_output=True, text=True, cwd=ROOT,
                               env={**env, "DIFFIT_TOOLKIT_TRACEBACK": "1"})
    else:
        shown = subprocess.run(base[:3] + ["--traceback"] + base[3:] + args, capture_output=True, text=True, cwd=ROOT,
                               env=env)
    assert shown.returncode == 2
    assert "ZeroDivisionError" in shown.stderr and str(plugin) in shown.stderr
    assert "dim * 3 // 0" in shown.stderr and "in project" in shown.stderr  # the plugin's frames, to the line
    assert shown.stdout.splitlines()[-1] == plain.stdout.splitlines()[-1]  # the same one line closes it


def test_a_plugin_that_exits_while_importing_is_a_usage_error_not_a_success(tmp_path, monkeypatch):
    from diffit_toolkit.registry import PLUGINS_ENV

    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    plugin = tmp_path / "exits_on_import_probe.py"
    plugin.write_text("import sys\nsys.exit(0)\n")
    out = RUNNER.invoke(app, ["-p", str(plugin), "plugins"], env=WIDE)
    assert out.exit_code == 2 and "called sys.exit(0) while importing" in out.output, out.output


def test_two_plugin_files_with_one_name_are_one_line(tmp_path, monkeypatch):
    import sys

    from diffit_toolkit.registry import PLUGINS_ENV, PluginSystem, use_plugin_system

    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "stem_clash_probe", raising=False)
    with use_plugin_system(PluginSystem()):  # the first file's mechanism stays out of the shared registries
        _two_plugin_files_with_one_name(tmp_path)
    sys.modules.pop("stem_clash_probe", None)


def _two_plugin_files_with_one_name(tmp_path):
    for folder, mechanism in (("a", "stem_clash_a"), ("b", "stem_clash_b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "stem_clash_probe.py").write_text(
            BROKEN_PLUGIN.replace("broken_traceback_probe", mechanism).replace("// 0", "// 1"))
    out = RUNNER.invoke(app, ["-p", str(tmp_path / "a" / "stem_clash_probe.py"), "-p",
                              str(tmp_path / "b" / "stem_clash_probe.py"), "plugins"], env=WIDE)
    assert out.exit_code == 2 and "is named like the module 'stem_clash_probe' already loaded" in out.output, out.output
    shadow = tmp_path / "json.py"
    shadow.write_text("x = 1\n")
    out = RUNNER.invoke(app, ["-p", str(shadow), "plugins"], env=WIDE)
    assert out.exit_code == 2 and "named like the module 'json'" in out.output
    import json

    assert hasattr(json, "dumps")  # the standard library was not replaced
