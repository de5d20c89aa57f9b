"""`diffit-toolkit eval RUN --guidance-scales ...`: one checkpoint sampled and scored per scale, with a plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.eval.sweep import best_row, guidance_sweep, parse_scales
from diffit_toolkit.inference.pipeline import load_pipeline
from diffit_toolkit.inference.writers import save_npz
from diffit_toolkit.build import load_recipe
from diffit_toolkit.train import train

runner = CliRunner()
TINY = ["train.max_steps=3", "train.batch_size=8", "train.warmup_steps=0", "model.hidden_size=16", "model.depth=1",
        "model.num_heads=2", "sample.num_images=10", "sample.steps=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "run"
    train(load_recipe("quickstart", [*TINY, f"output_dir={out}"]), device="cpu", progress=False)
    return out


def test_sweep_samples_every_scale_with_the_same_seed_and_count(run_dir):
    gen = load_pipeline(run_dir, device="cpu")
    calls = []

    def sample(num_images, settings, batch_size=64, seed=0, progress=None):
        calls.append((settings.guidance_scale, seed, num_images, settings.sampler))
        progress(num_images)
        return torch.full((num_images, 1, 8, 8), settings.guidance_scale / 10), torch.arange(num_images) % 10

    gen.sample = sample
    seen = []
    rows = guidance_sweep(gen, [1.0, 3.0, 2.0], gen.recipe.sample, 6, lambda images, labels: {"fd": float(images.mean())},
                          seed=1, progress=lambda *a: seen.append(a))
    assert calls == [(1.0, 1, 6, "heun"), (3.0, 1, 6, "heun"), (2.0, 1, 6, "heun")]  # same seed: same noise and labels
    assert seen == [(6, 6, f"sampling at guidance {s}") for s in (1, 3, 2)]
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0, 2.0]
    assert best_row(rows)["guidance_scale"] == 1.0 and all(r["sample_seconds"] >= 0 for r in rows)


def test_eval_command_sweeps_a_run_and_writes_table_plot_and_json(run_dir, tmp_path):
    result = runner.invoke(app, ["eval", str(run_dir), "--guidance-scales", "1,2", "--num", "20", "--steps", "2",
                                 "--plot", str(tmp_path / "g.png"), "--csv", str(tmp_path / "g.csv"),
                                 "--json", str(tmp_path / "g.json")])
    assert result.exit_code == 0, result.output
    assert "guidance 1:" in result.output and "guidance 2:" in result.output and "best FD" in result.output
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 2.0]
    assert all(float(r["num_images"]) == 20 and float(r["fd"]) > 0 for r in rows)
    assert (tmp_path / "g.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "g.json").read_text())) == 2
    # a checkpoint folder works as well, at the recipe's own scale by default
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    one = runner.invoke(app, ["eval", str(ckpt), "--num", "10", "--steps", "2"])
    assert one.exit_code == 0 and one.output.count("guidance ") == 1, one.output


@pytest.mark.parametrize("args, message", [
    (["--guidance-scales", "1,x"], "comma-separated numbers"),
    (["--guidance-scales", "1,-2"], ">= 0"),
    (["--sampler", "ddim"], "does not sample"),
    (["--ref", "nothere"], "no such file"),
    (["--metric", "inception"], "need --ref"),
    (["--metric", "shapes"], "32x32 RGB shapes"),
])
def test_sweep_errors_are_one_line(run_dir, args, message):
    result = runner.invoke(app, ["eval", str(run_dir), "--num", "4", *args])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_guidance_options_need_a_model_not_images(tmp_path):
    save_npz(torch.zeros(4, 1, 8, 8), torch.arange(4), tmp_path / "s.npz")
    result = runner.invoke(app, ["eval", str(tmp_path / "s.npz"), "--guidance-scales", "1,2"])
    assert result.exit_code == 2 and "run or checkpoint folder" in result.output


def test_parse_scales():
    assert parse_scales("1, 1.5,2") == [1.0, 1.5, 2.0]
    with pytest.raises(ValueError):
        parse_scales("")


def test_edm_guidance_interval_guides_only_inside_the_noise_range():
    from diffit_toolkit.diffusion.edm import EDMPrecond
    from diffit_toolkit.process import build_process
    from diffit_toolkit.recipe import SampleSection, process_options

    process = build_process(process_options({"process": "edm"}))
    sample = SampleSection(sampler="heun", guidance_scale=3.0, guidance_interval=(0.29, 0.59))

    def model(x, t, y):  # conditional output 1, unconditional 0: the guided value is the scale
        return (y != 10).to(x.dtype).view(-1, 1, 1, 1).expand_as(x).clone()

    guided = process.guided(model, sample, null_class=10)
    x, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    c_noise = EDMPrecond().c_noise(torch.tensor([0.1, 1.0, 20.0], dtype=torch.float64))  # below, inside, above
    out = guided(x, c_noise, y)[:, 0, 0, 0]
    assert out.tolist() == [1.0, 3.0, 1.0]


def test_sample_guidance_interval_applies_and_bad_values_are_one_line(run_dir, tmp_path):
    def draw(name, *extra):
        result = runner.invoke(app, ["sample", str(run_dir), "-n", "4", "--steps", "6", "--guidance-scale", "4",
                                     "--device", "cpu", "--no-progress", "--npz", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        import numpy as np

        return np.load(tmp_path / name)["arr_0"]

    everywhere, unguided = draw("a.npz"), draw("b.npz", "--guidance-scale", "1")
    assert (everywhere != unguided).any()
    assert (draw("c.npz", "--guidance-interval", "0,0") == unguided).all()  # an empty interval: no guidance
    assert (draw("d.npz", "--guidance-interval", "0,1") == everywhere).all()
    assert (draw("e.npz", "--guidance-interval", "none") == everywhere).all()
    for bad, message in (("0.6,0.2", "LO <= HI"), ("x", "LO,HI fractions")):
        result = runner.invoke(app, ["sample", str(run_dir), "-n", "2", "--guidance-interval", bad, "--device", "cpu"])
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


@pytest.mark.parametrize("text", ["1e308", "1,20000", "inf", "-1"])
def test_guidance_scales_out_of_the_recipes_range_are_one_line(text):
    from diffit_toolkit.eval.sweep import parse_scales

    with pytest.raises(ValueError, match="guidance scales must be finite numbers >= 0 and at most 10000"):
        parse_scales(text)
