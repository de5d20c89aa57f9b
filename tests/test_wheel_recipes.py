"""A built wheel carries the shipped recipes: ``diffit-toolkit train quickstart`` works from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_has_the_recipes(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("diffit_toolkit-*.whl"))
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        # run outside the checkout, so only the installed copy can be imported
        return subprocess.run([sys.executable, "-m", "diffit_toolkit", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-c", "import diffit_toolkit.recipe as r; print(r.__file__, r.RECIPES_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert where.stdout.split() == [str(target / "diffit_toolkit" / "recipe.py"), str(target / "diffit_toolkit" / "recipes")]
    shipped = sorted(p.relative_to(ROOT / "recipes") for p in (ROOT / "recipes").rglob("*.yaml"))
    installed = sorted(p.relative_to(target / "diffit_toolkit" / "recipes")
                       for p in (target / "diffit_toolkit" / "recipes").rglob("*.yaml"))
    assert installed == shipped  # nested suites too (recipes/ablation/shapes/*.yaml)
    shown = cli("recipe", "show", "quickstart")
    assert shown.returncode == 0 and "name: quickstart" in shown.stdout, shown.stderr[-2000:]
    trained = cli("train", "quickstart", "--device", "cpu", "--no-progress", "--output-dir", str(tmp_path / "run"),
                  "--set", "train.max_steps=1", "--set", "train.batch_size=16", "--set", "sample.num_images=2",
                  "--set", "sample.steps=2")
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-2000:]
    assert (tmp_path / "run" / "recipe.yaml").is_file()
