"""The CLI's plugin listing and the documentation's runnable examples."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.registry import conditioning

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def test_plugins_lists_every_mechanism_and_backend_with_its_source():
    result = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in ("tmsa", "window_tmsa", "adaln_zero", "relative_bias", "mlp", "separate_token", "additive",
                 "math", "sdpa", "flex", "xformers", "positional", "fourier"):
        row = next((line for line in lines if line.split("│")[1:2] and line.split("│")[1].strip() == name), None)
        assert row is not None, f"{name} not listed"
        assert "diffit-toolkit" in row


def test_plugins_for_one_kind_and_unknown_kind():
    result = CliRunner().invoke(app, ["plugins", "--kind", "attention"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "sdpa" in result.output and "tmsa" not in result.output


def test_user_plugin_example_runs_and_is_short(plugin_system, capsys):
    source = (EXAMPLES / "user_plugin.py").read_text()
    assert len([line for line in source.splitlines() if line.strip()]) < 30  # lines of code
    runpy.run_path(str(EXAMPLES / "user_plugin.py"), run_name="user_plugin_example")
    assert "gated_tmsa: (2, 64, 64)" in capsys.readouterr().out
    assert conditioning.entry("gated_tmsa").source == "user_plugin_example"


def test_quick_tour_builds_every_mechanism(capsys):
    runpy.run_path(str(EXAMPLES / "quick_tour.py"))
    out = capsys.readouterr().out
    for name in conditioning.names():
        assert f"{name} " in out


@pytest.mark.parametrize("page", sorted((ROOT / "docs").rglob("*.md")), ids=lambda p: p.name)
def test_docs_pages_only_include_existing_snippets(page):
    for line in page.read_text().splitlines():
        if line.startswith("--8<--"):
            assert (ROOT / line.split('"')[1]).is_file(), line


# -- start-up: the command line imports the model stack only when a command needs it -----------

IMPORTED = """
import sys
from diffit_toolkit.cli import app
app(sys.argv[1:], standalone_mode=False)
print("IMPORTED", *sorted(m for m in ("torch", "timm", "torchvision", "sympy") if m in sys.modules))
"""


@pytest.mark.parametrize(("args", "allowed"), [
    (["--help"], []),
    # the diffusion section is resolved against its process's declared options: the process
    # plugins are torch modules (not timm, torchvision, sympy)
    (["recipe", "show", "quickstart"], ["torch"]),
    (["--version"], []),
    (["plugins", "--kind", "attention"], ["torch"]),  # the plugins are torch modules; not timm, torchvision, sympy
])
def test_light_commands_start_without_the_model_stack(args, allowed):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", IMPORTED, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = next(line for line in proc.stdout.splitlines() if line.startswith("IMPORTED")).split()[1:]
    assert imported == allowed


def test_version_option_and_lazy_package_root():
    import diffit_toolkit

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == diffit_toolkit.__version__
    from diffit_toolkit.nn.block import DiffiTBlock

    assert diffit_toolkit.DiffiTBlock is DiffiTBlock and "DiffiTBlock" in dir(diffit_toolkit)
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        diffit_toolkit.NoSuchName  # noqa: B018
