"""Weights in and out: save/from_pretrained, ``export``, sampling from every kind of weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.backbones import from_pretrained
from diffit_toolkit.backbones.image import ImageDiffiT
from diffit_toolkit.backbones.latent import LatentDiffiT
from diffit_toolkit.build import load_recipe
from diffit_toolkit.cli import app
from diffit_toolkit.inference.pipeline import load_pipeline
from diffit_toolkit.registry import backbones
from diffit_toolkit.runs import latest_checkpoint, load_checkpoint, save_model_file
from diffit_toolkit.train import train

RUNNER = CliRunner()
WIDE = {"COLUMNS": "300"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_recipe):
    folder = tmp_path_factory.mktemp("export")
    result = train(load_recipe(tiny_recipe(folder, "run", max_steps=3)), device="cpu", progress=False)
    return folder, result


@pytest.mark.parametrize(("name", "preset", "options", "shape"), [
    ("latent_diffit", None, dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                 num_classes=5), (2, 4, 8, 8)),
    ("dit", None, dict(input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                       num_classes=0), (2, 4, 8, 8)),
    ("image_diffit", None, dict(input_size=16, channels=[32, 32], num_blocks=[1, 1], head_dim=16, time_dim=32,
                                num_classes=3, norm_groups=8, window=4), (2, 3, 16, 16)),
])
def test_save_pretrained_round_trip_every_backbone(tmp_path, name, preset, options, shape):
    torch.manual_seed(0)
    model = backbones.build(name, preset, **options).eval()
    with torch.no_grad():  # non-trivial weights everywhere (zero-initialised layers included)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["backbone"] == name
    cls = ImageDiffiT if name == "image_diffit" else LatentDiffiT
    loaded = cls.from_pretrained(tmp_path / "m")
    x, t = torch.randn(shape), torch.tensor([3, 500])
    y = torch.tensor([1, 2]) if model.num_classes else None
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    other = LatentDiffiT if cls is ImageDiffiT else ImageDiffiT
    with pytest.raises(ValueError, match=f"not a {other.__name__}"):
        other.from_pretrained(tmp_path / "m")


def test_from_pretrained_names_mismatched_keys(tmp_path):
    model = backbones.build("dit", None, input_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2,
                            num_heads=2, num_classes=0)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["depth"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing key\(s\) \[blocks\.2\."):
        from_pretrained(tmp_path / "m")


def test_train_export_from_pretrained_gives_identical_outputs(tiny_run):
    folder, result = tiny_run
    out = RUNNER.invoke(app, ["export", str(folder / "run"), str(folder / "exported")], env=WIDE)
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in (folder / "exported").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                      "sampling.json", "training_recipe.yaml"]
    model = LatentDiffiT.from_pretrained(folder / "exported")
    ema = load_checkpoint(result.checkpoint)["ema"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 900]), torch.tensor([0, 4, 9])
    result.ema.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), result.ema(x, t, y))
    # the same images from the run and from the export
    a = load_pipeline(folder / "run", device="cpu")
    b = load_pipeline(folder / "exported", device="cpu")
    assert b.recipe.sample == a.recipe.sample and b.recipe.diffusion == a.recipe.diffusion
    ia, _ = a.sample(4, a.recipe.sample, classes=[2], batch_size=4, seed=3)
    ib, _ = b.sample(4, b.recipe.sample, classes=[2], batch_size=4, seed=3)
    assert torch.equal(ia, ib)
    again = RUNNER.invoke(app, ["export", str(folder / "run"), str(folder / "exported")], env=WIDE)
    assert again.exit_code == 2 and "not an empty folder" in again.output
    tmsa = RUNNER.invoke(app, ["export", str(folder / "run"), str(folder / "as_diffusers"), "--diffusers"], env=WIDE)
    assert tmsa.exit_code == 2 and "only DiT models (mechanism adaln_zero" in tmsa.output


def test_export_model_weights_differ_from_ema(tiny_run):
    folder, result = tiny_run
    assert RUNNER.invoke(app, ["export", str(folder / "run"), str(folder / "raw"), "--weights", "model"]).exit_code == 0
    raw = LatentDiffiT.from_pretrained(folder / "raw")
    state = load_checkpoint(result.checkpoint)["model"]
    assert all(torch.equal(v, state[k]) for k, v in raw.state_dict().items())


def test_sample_cli_from_exported_folder_step_folder_and_single_file(tiny_run, tmp_path):
    folder, result = tiny_run
    exported = folder / "exported"
    if not exported.is_dir():
        assert RUNNER.invoke(app, ["export", str(folder / "run"), str(exported)]).exit_code == 0
    for source in (exported, result.checkpoint):
        out = RUNNER.invoke(app, ["sample", str(source), "--num", "4", "--classes", "5", "--device", "cpu",
                                  "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g.png")], env=WIDE)
        assert out.exit_code == 0, out.output
        assert np.load(tmp_path / "s.npz")["arr_1"].tolist() == [5] * 4
    # a single model file carries no sampling settings: --recipe gives them
    single = save_model_file(LatentDiffiT.from_pretrained(exported), tmp_path / "tiny.safetensors")
    recipe = folder / "run.yaml"
    out = RUNNER.invoke(app, ["sample", str(single), "--recipe", str(recipe), "--num", "3", "--device", "cpu",
                              "--npz", str(tmp_path / "f.npz"), "--out", str(tmp_path / "f.png")], env=WIDE)
    assert out.exit_code == 0, out.output
    from_file = np.load(tmp_path / "f.npz")["arr_0"]
    out = RUNNER.invoke(app, ["sample", str(exported), "--num", "3", "--device", "cpu",
                              "--npz", str(tmp_path / "e.npz"), "--out", str(tmp_path / "e.png")], env=WIDE)
    assert np.array_equal(np.load(tmp_path / "e.npz")["arr_0"], from_file)


def test_sample_missing_folder_and_latent_without_vae(tmp_path):
    out = RUNNER.invoke(app, ["sample", str(tmp_path / "nothere"), "--device", "cpu"], env=WIDE)
    assert out.exit_code == 2 and f"no such folder: {tmp_path / 'nothere'}" in out.output
    latent = backbones.build("dit", None, input_size=4, in_channels=4, patch_size=2, hidden_size=32, depth=1,
                             num_heads=2, num_classes=0)
    latent.save_pretrained(tmp_path / "latent")
    out = RUNNER.invoke(app, ["sample", str(tmp_path / "latent"), "--num", "2", "--steps", "2", "--device", "cpu"], env=WIDE)
    assert out.exit_code == 2 and "pass --vae" in out.output
    gone = RUNNER.invoke(app, ["sample", str(tmp_path / "latent"), "--vae", str(tmp_path / "novae"), "--num", "2",
                               "--steps", "2", "--device", "cpu"], env=WIDE)
    assert gone.exit_code == 2 and "novae" in gone.output


def test_train_init_from_copies_weights_and_names_mismatched_keys(tiny_run, tmp_path, tiny_recipe):
    folder, result = tiny_run
    recipe = tiny_recipe(tmp_path, "tuned", max_steps=1)
    out = RUNNER.invoke(app, ["train", str(recipe), "--device", "cpu", "--no-progress", "--init-from",
                              str(folder / "run"), "--set", "train.lr=1e-9"], env=WIDE)
    assert out.exit_code == 0, out.output
    # lr 1e-9: one AdamW step moves the weights by about 1e-9 from where they started (the run's EMA)
    tuned = load_checkpoint(latest_checkpoint(tmp_path / "tuned"))
    source = load_checkpoint(result.checkpoint)
    for key, value in source["ema"].items():
        torch.testing.assert_close(tuned["model"][key], value, atol=1e-7, rtol=0)
    assert tuned["state"]["step"] == 1
    fresh = train(load_recipe(tiny_recipe(tmp_path, "fresh", max_steps=1, lr=1e-9)), device="cpu", progress=False)
    assert not torch.allclose(fresh.model.state_dict()["final_layer.linear.weight"],
                              source["ema"]["final_layer.linear.weight"], atol=1e-4)
    wider = tiny_recipe(tmp_path, "wider", max_steps=1)
    bad = RUNNER.invoke(app, ["train", str(wider), "--device", "cpu", "--no-progress", "--init-from",
                              str(folder / "run"), "--set", "model.hidden_size=48"], env=WIDE)
    assert bad.exit_code == 2, bad.output
    assert "--init-from" in bad.output and "mis-shaped key(s) [" in bad.output
    assert "qkv.weight (96, 32) in file vs (144, 48) in model" in bad.output and "ValueError" not in bad.output
    missing = RUNNER.invoke(app, ["train", str(wider), "--device", "cpu", "--no-progress", "--init-from",
                                  str(tmp_path / "nothere")], env=WIDE)
    assert missing.exit_code == 2 and "no such folder" in missing.output
