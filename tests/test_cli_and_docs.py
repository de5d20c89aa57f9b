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
    assert len(source.strip().splitlines()) < 30
    runpy.run_path(str(EXAMPLES / "user_plugin.py"), run_name="user_plugin_example")
    assert "gated_tmsa: (2, 64, 64)" in capsys.readouterr().out
    assert conditioning.entry("gated_tmsa").source == "user_plugin_example"


def test_quick_tour_builds_every_mechanism(capsys):
    runpy.run_path(str(EXAMPLES / "quick_tour.py"))
    out = capsys.readouterr().out
    for name in conditioning.names():
        assert f"{name} " in out


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_pages_only_include_existing_snippets(page):
    for line in page.read_text().splitlines():
        if line.startswith("--8<--"):
            assert (ROOT / line.split('"')[1]).is_file(), line
