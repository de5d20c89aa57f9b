"""A run writes only inside its folder: real symbolic links planted in a run folder, pointing at
files and folders outside it, are never written through (training resumes refuse them with one
line; a grid or sample written at a link's name replaces the link, not its target)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.runs import write_text_atomic


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_recipe) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    tmp = tmp_path_factory.mktemp("links")
    recipe = tiny_recipe(tmp, "run", max_steps=2, ckpt_every=1, keep_last=1)
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--set", "sample.num_images=4")
    assert code == 0, output
    return tmp / "run"


@pytest.fixture
def run(tmp_path, finished) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _plant(run: Path, name: str, outside: Path) -> bytes | None:
    """Replace ``run/name`` with a link to ``outside`` (a file, or a folder holding a step folder)."""
    target = run / name
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
        outside.mkdir()
        (outside / "step_0000001").mkdir()
        (outside / "step_0000001" / "precious.txt").write_text("keep me")
        target.symlink_to(outside, target_is_directory=True)
        return None
    target.unlink(missing_ok=True)
    outside.write_bytes(b"precious bytes\n")
    target.symlink_to(outside)
    return outside.read_bytes()


@pytest.mark.parametrize("name", [".lock", "recipe.yaml", "metrics.jsonl", "environment.json", "samples.png",
                                  "loss.png", "checkpoints", "samples"])
def test_resuming_refuses_a_link_in_the_run_folder_and_leaves_its_target(run, tmp_path, tiny_recipe, name):
    (run / "samples").mkdir(exist_ok=True)
    before = _plant(run, name, tmp_path / "outside")
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=1, keep_last=1)
    code, output = invoke("train", str(recipe), "--device", "cpu", "--no-progress", "--set", "sample.num_images=4")
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, output
    assert f"{run / name} is a symbolic link; a run writes only inside its folder" in errors[0]
    if before is None:  # a linked folder: its contents are untouched (nothing pruned, nothing added)
        assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["step_0000001"]
        assert (tmp_path / "outside" / "step_0000001" / "precious.txt").read_text() == "keep me"
    else:
        assert (tmp_path / "outside").read_bytes() == before


def test_sample_refuses_a_linked_grid_in_the_run_folder(run, tmp_path):
    (run / "samples").mkdir(exist_ok=True)
    before = _plant(run, "samples/sample.png", tmp_path / "outside.png")
    code, output = invoke("sample", str(run), "--num", "4", "--steps", "2", "--device", "cpu", "--no-progress")
    assert code == 1 and f"{run / 'samples' / 'sample.png'} is a symbolic link" in output, output
    assert (tmp_path / "outside.png").read_bytes() == before


def test_a_grid_written_at_a_links_name_replaces_the_link(run, tmp_path):
    before = _plant(run, "elsewhere.png", tmp_path / "outside.png")
    code, output = invoke("sample", str(run), "--num", "4", "--steps", "2", "--device", "cpu", "--no-progress",
                          "--out", str(run / "elsewhere.png"))
    assert code == 0, output
    assert (tmp_path / "outside.png").read_bytes() == before
    assert not (run / "elsewhere.png").is_symlink() and (run / "elsewhere.png").stat().st_size > 100


def test_sample_refuses_a_linked_samples_folder(run, tmp_path):
    (run / "samples").mkdir(exist_ok=True)
    before = _plant(run, "samples", tmp_path / "outside")
    assert before is None
    code, output = invoke("sample", str(run), "--num", "4", "--steps", "2", "--device", "cpu", "--no-progress")
    assert code == 1 and f"{run / 'samples'} is a symbolic link" in output, output
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["step_0000001"]


def test_atomic_writes_never_share_a_temporary_file_and_leave_none_behind(tmp_path):
    path = tmp_path / "out" / "table.md"
    write_text_atomic(path, "one")
    link = tmp_path / "out" / "link.md"
    (tmp_path / "elsewhere.md").write_text("theirs")
    link.symlink_to(tmp_path / "elsewhere.md")
    write_text_atomic(link, "mine")
    assert path.read_text() == "one" and link.read_text() == "mine" and not link.is_symlink()
    assert (tmp_path / "elsewhere.md").read_text() == "theirs"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["link.md", "table.md"]
