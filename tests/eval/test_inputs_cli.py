"""Inputs of `diffit-toolkit eval` and its one-line errors; the digits path on an ADM .npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.eval.inputs import InputError, load_image_set
from diffit_toolkit.eval.metrics import INCEPTION_WEIGHTS_FILE, MissingWeightsError, find_inception_weights
from diffit_toolkit.inference.writers import save_npz

runner = CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_npz_folder_and_reference_batch_layouts(tmp_path):
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    save_npz(images, torch.arange(6), tmp_path / "s.npz")
    s = load_image_set(tmp_path / "s.npz")
    assert s.images.shape == (6, 3, 8, 8) and s.images.dtype == torch.uint8 and s.labels.tolist() == list(range(6))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(folder / f"{i}.png")
    assert load_image_set(folder).images.shape == (3, 3, 8, 8)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    ref = load_image_set(tmp_path / "ref.npz")
    assert ref.images is None and ref.stats.mu.shape == (4,)


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image_set(tmp_path / "missing.npz")
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="arr_0"):
        load_image_set(tmp_path / "wrong.npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32) + 0.5)
    with pytest.raises(InputError, match="uint8"):
        load_image_set(tmp_path / "float.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(4))
    with pytest.raises(InputError, match="sigma"):
        load_image_set(tmp_path / "half.npz")
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "b.png")
    with pytest.raises(InputError, match="differs"):
        load_image_set(folder)
    result = runner.invoke(app, ["eval", str(tmp_path / "wrong.npz"), "--metric", "digits"])
    assert "arr_0" in _one_line_error(result)


def test_missing_inception_weights_say_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError, match=INCEPTION_WEIGHTS_FILE):
        find_inception_weights()
    save_npz(torch.zeros(4, 1, 8, 8), None, tmp_path / "s.npz")
    line = _one_line_error(runner.invoke(app, ["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")]))
    assert INCEPTION_WEIGHTS_FILE in line and "--inception-weights" in line
    line = _one_line_error(runner.invoke(app, ["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                                               "--inception-weights", str(tmp_path / "nope.pth")]))
    assert "nope.pth" in line and INCEPTION_WEIGHTS_FILE in line
    monkeypatch.setenv("DIFFIT_INCEPTION_WEIGHTS", str(tmp_path / "s.npz"))  # a file, but not the weights
    with pytest.raises(MissingWeightsError):
        from diffit_toolkit.eval.metrics import inception_extractor

        inception_extractor()


def test_eval_digits_metric_on_an_adm_npz(tmp_path):
    from diffit_toolkit.data import build_dataset

    ds = build_dataset("digits", split="test")
    x = torch.stack([ds[i][0] for i in range(200)])
    y = torch.tensor([int(ds[i][1]) for i in range(200)])
    save_npz(x, y, tmp_path / "real.npz")  # the layout `diffit-toolkit sample --npz` writes
    result = runner.invoke(app, ["eval", str(tmp_path / "real.npz"), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "floor" in result.output
    import json

    numbers = json.loads((tmp_path / "m.json").read_text())
    assert numbers["accuracy"] > 0.9 and numbers["fd"] < 2 * numbers["floor"]
    bigger = tmp_path / "big.npz"
    np.savez(bigger, arr_0=np.zeros((4, 24, 24, 3), np.uint8))  # no offline judge takes 24x24
    assert "8x8" in _one_line_error(runner.invoke(app, ["eval", str(bigger)]))


def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path):
    import os
    import subprocess
    import sys

    fifo = tmp_path / "samples.npz"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "diffit_toolkit.cli", "eval", str(fifo)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 2 and "not a regular file (a pipe, socket or device)" in proc.stdout, proc.stdout


def test_a_file_that_is_not_a_zip_is_called_what_it_is(tmp_path):
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app
    from diffit_toolkit.data import build_dataset

    path = tmp_path / "samples.npz"
    path.write_bytes(b"plain text, not an archive")
    out = CliRunner().invoke(app, ["eval", str(path), "--metric", "digits"], env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "not an .npz (not a zip archive" in out.output and "pickled" not in out.output
    with pytest.raises(ValueError, match="not an .npz \\(not a zip archive"):
        build_dataset("npz", path=str(path))
