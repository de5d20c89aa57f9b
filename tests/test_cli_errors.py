"""One-line errors with the documented exit codes (2: usage, 1: run-time failure)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app

RUNNER = CliRunner()
WIDE = {"COLUMNS": "300"}


def test_model_info_unknown_backbone_is_a_usage_error():
    out = RUNNER.invoke(app, ["model-info", "-b", "ditt"], env=WIDE)
    assert out.exit_code == 2 and "unknown backbone 'ditt'; did you mean 'dit'?" in out.output
    assert "Traceback" not in out.output
    preset = RUNNER.invoke(app, ["model-info", "-b", "dit", "-p", "XL/3"], env=WIDE)
    assert preset.exit_code == 2 and "unknown preset(s) XL/3" in preset.output


def test_convert_of_a_wrong_file_is_a_usage_error(tmp_path):
    out = RUNNER.invoke(app, ["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o.safetensors")], env=WIDE)
    assert out.exit_code == 2 and "does not exist" in out.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("command", [["train", "quickstart"], ["sample", "runs/nothere"]])
def test_cuda_without_a_gpu_is_one_line(command):
    out = RUNNER.invoke(app, [*command, "--device", "cuda"], env=WIDE)
    assert out.exit_code == 2 and "PyTorch sees no CUDA GPU here" in out.output and "--device cpu" in out.output
    assert "Traceback" not in out.output


def test_unknown_device_name_is_one_line():
    out = RUNNER.invoke(app, ["sample", "runs/nothere", "--device", "gpu0"], env=WIDE)
    assert out.exit_code == 2 and "unknown device 'gpu0': use cpu, cuda or cuda:N" in out.output
