"""CLI arguments that used to end in a traceback: each is now one line and a non-zero exit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffit_toolkit.cli import app


def run(*args: str):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, result.output


def one_line(output: str) -> str:
    assert output.count("\n") == 1 and output.startswith("error: "), output
    return output


@pytest.mark.parametrize("device", ["tpu", "cuda:99x", "potato"])
def test_an_unknown_device_is_one_line(tmp_path, device):
    # protection: runs.environment.parse_device, used by sample and train
    code, output = run("sample", str(tmp_path), "--device", device)
    assert code == 2 and f"unknown device '{device}': use cpu, cuda or cuda:N" in one_line(output)
    code, output = run("train", "quickstart", "--output-dir", str(tmp_path / "run"), "--device", device)
    assert code == 2 and "unknown device" in one_line(output)
    assert not (tmp_path / "run").exists()


def test_sample_out_as_a_folder_is_refused_before_sampling(tmp_path):
    code, output = run("sample", str(tmp_path / "run"), "--out", str(tmp_path), "--device", "cpu")
    assert code == 2 and f"--out {tmp_path} is a folder" in one_line(output)
    code, output = run("sample", str(tmp_path / "run"), "--npz", str(tmp_path), "--device", "cpu")
    assert code == 2 and "--npz" in one_line(output) and "is a folder" in output


def test_eval_json_as_a_folder_is_refused_before_scoring(tmp_path):
    code, output = run("eval", str(tmp_path / "samples.npz"), "--json", str(tmp_path))
    assert code == 2 and f"--json {tmp_path} is a folder" in one_line(output)


@pytest.mark.parametrize("content", [b"\x00" * 7, b"garbage that is not safetensors at all", None])
def test_convert_a_malformed_safetensors_is_one_line(tmp_path, content):
    # protection: runs.model_file.read_state_dict catches SafetensorError
    src = tmp_path / "weights.safetensors"
    if content is None:  # a real file cut short (a torn download)
        save_file({"w": torch.randn(1000)}, str(src))
        src.write_bytes(src.read_bytes()[:-100])
    else:
        src.write_bytes(content)
    code, output = run("convert", str(src), str(tmp_path / "out.safetensors"))
    assert code == 2 and "as safetensors" in one_line(output)  # a bad input file is a usage error


def test_convert_into_a_folder_is_one_line(tmp_path):
    src = tmp_path / "weights.safetensors"
    save_file({"w": torch.randn(4)}, str(src))
    code, output = run("convert", str(src), str(tmp_path))
    assert code == 2 and "is a folder" in one_line(output)


@pytest.mark.parametrize("command", ["sample --out", "sample --npz", "bench --out", "export"])
def test_an_output_name_too_long_or_under_a_file_is_one_line_before_any_work(tmp_path, command):
    long = "x" * 300
    name, _, option = command.partition(" ")
    suffix = {"--out": ".png", "--npz": ".npz"}.get(option, "")
    if name == "bench":
        suffix = ".json"
    for target, expected in ((tmp_path / (long + suffix), "too long"),
                             (tmp_path / "file.txt" / ("o" + suffix), "is a file, not a folder")):
        (tmp_path / "file.txt").write_text("x")
        if name == "sample":
            args = ["sample", str(tmp_path / "run"), option, str(target), "--device", "cpu"]
        elif name == "bench":
            args = ["bench", "--device", "cpu", "--out", str(target)]
        else:
            args = ["export", str(tmp_path / "run"), str(target)]
        code, output = run(*args)
        assert code == 2 and expected in one_line(output), output
