"""A trained toolkit DiT leaves as a complete diffusers ``DiTPipeline`` folder with its model card,
and diffusers (in a process that never imports the toolkit) samples from it the images that
``diffit-toolkit sample`` draws with the same scheduler and guided channels."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffit_toolkit.build import validate_recipe
from diffit_toolkit.cli import app
from diffit_toolkit.train import train

diffusers = pytest.importorskip("diffusers")

RUNNER = CliRunner()
WIDE = {"COLUMNS": "300"}
#: DiTPipeline labels the unconditional half with class 1000: a model with 1000 classes guides in diffusers too.
CLASSES = 1000
#: Not the VAE's own scaling factor (0.18215): the export must carry the run's.
LATENT_SCALE = 0.5


def _latent_cache(root, classes: int):
    """A tiny VAE and a latent cache of random latents (8x8x4) with ``classes`` labels."""
    from safetensors.torch import save_file

    from diffit_toolkit.data.latents import LatentMeta, shard_name

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(root / "vae")
    count, g = 32, torch.Generator().manual_seed(0)
    (root / "latents").mkdir()
    save_file({"latents": torch.randn(count, 2, 4, 8, 8, generator=g).half(),
               "labels": torch.randint(0, classes, (count,), generator=g)}, str(root / "latents" / shard_name(0)))
    LatentMeta(latent_scale=LATENT_SCALE, vae=str(root / "vae"), channels=4, resolution=8, image_resolution=8,
               num_classes=classes, class_names=[f"thing {i}" for i in range(classes)], num_items=count,
               shards=[{"file": shard_name(0), "count": count}]).save(root / "latents")


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A DiT with diffusers' time features trained 3 steps on the cached latents (EMA = weights)."""
    root = tmp_path_factory.mktemp("pipeline")
    _latent_cache(root, CLASSES)
    recipe = validate_recipe({
        "name": "tiny_dit", "output_dir": str(root / "run"),
        "model": {"backbone": "dit", "preset": None, "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2,
                  "time_feature_options": {"freq_shift": 1}},
        "diffusion": {"process": "gaussian", "learn_sigma": True},
        "data": {"kind": "latents", "path": str(root / "latents")},
        "train": {"batch_size": 8, "max_steps": 3, "log_every": 1, "lr": 1e-2, "ema_decay": 0.0},
        "sample": {"sampler": "ddim", "steps": 5, "num_images": 4, "guidance_scale": 1.5, "guided_channels": 3},
    })
    train(recipe, device="cpu", progress=False)
    return root


#: Run by a fresh interpreter: diffusers alone, the toolkit's per-image seeds, uint8 as diffusers makes them.
_DIFFUSERS_ONLY = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from diffusers import DiTPipeline
    folder, seed, count, classes, steps, scale, out = sys.argv[1:]
    seed, count, steps, scale = int(seed), int(count), int(steps), float(scale)
    classes = [int(c) for c in classes.split(",")]
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                  for i in range(count)]
    labels = [classes[i % len(classes)] for i in range(count)]
    images = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=scale, generator=generators,
                  output_type="np").images
    np.save(out, (images * 255).round().astype("uint8"))
    assert not any(m.startswith("diffit") for m in sys.modules), "the toolkit was imported"
    print(len(pipe.labels), pipe.get_label_ids(["thing 7"]), type(pipe.scheduler).__name__)
""")


def test_pipeline_export_samples_in_diffusers_as_the_toolkit_does(dit_run, tmp_path):
    out = RUNNER.invoke(app, ["export", str(dit_run / "run"), str(tmp_path / "pipe"), "--diffusers-pipeline"], env=WIDE)
    assert out.exit_code == 0, out.output
    pipe = tmp_path / "pipe"
    assert sorted(p.name for p in pipe.iterdir()) == ["README.md", "model_index.json", "scheduler", "training_recipe.yaml",
                                                      "transformer", "vae"]
    index = json.loads((pipe / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["id2label"]["7"] == "thing 7" and len(index["id2label"]) == CLASSES
    scheduler = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["prediction_type"], scheduler["clip_sample"]) == ("linear", "epsilon", False)
    assert json.loads((pipe / "vae" / "config.json").read_text())["scaling_factor"] == LATENT_SCALE
    card = (pipe / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusers" and meta["license"] == "other" and "DiTPipeline" in meta["tags"]
    assert "guides the first 3 of the 4 latent channels" in card and "DiTPipeline guides all 4" in card
    assert "Trained for 3 steps" in card and "diffit-toolkit train training_recipe.yaml" in card

    seed, count, steps, scale, classes = 3, 4, 5, 1.5, "5,7"
    proc = subprocess.run([sys.executable, "-c", _DIFFUSERS_ONLY, str(pipe), str(seed), str(count), classes, str(steps),
                           str(scale), str(tmp_path / "diffusers.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == [str(CLASSES), "[7]"] and proc.stdout.split()[2] == "DDIMScheduler"
    theirs = np.load(tmp_path / "diffusers.npy")
    ours_args = ["--sampler", "diffusers:DDIMScheduler", "--guided-channels", "4", "--guidance-scale", str(scale),
                 "--steps", str(steps), "--classes", classes, "-n", str(count), "--seed", str(seed), "--device", "cpu",
                 "--no-progress"]
    ours = RUNNER.invoke(app, ["sample", str(dit_run / "run"), *ours_args, "--npz", str(tmp_path / "ours.npz")], env=WIDE)
    assert ours.exit_code == 0, ours.output
    mine = np.load(tmp_path / "ours.npz")["arr_0"]
    assert theirs.shape == mine.shape == (count, 8, 8, 3) and theirs.std() > 5  # decoded images, not a flat colour
    assert np.array_equal(theirs, mine)
    # the toolkit samples the folder's transformer as it was trained, with the advice it gives for the folder
    advice = RUNNER.invoke(app, ["sample", str(pipe), "-n", "1", "--device", "cpu"], env=WIDE)
    assert advice.exit_code == 2 and advice.output.strip().endswith(
        f"(to sample, add --vae {pipe / 'vae'} --recipe {pipe / 'training_recipe.yaml'})"), advice.output
    again = RUNNER.invoke(app, ["sample", str(pipe / "transformer"), "--vae", str(pipe / "vae"), "--recipe",
                                str(pipe / "training_recipe.yaml"), *ours_args, "--npz", str(tmp_path / "again.npz")],
                          env=WIDE)
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.load(tmp_path / "again.npz")["arr_0"], theirs)


def test_pipeline_export_refusals_name_the_reason_and_write_nothing(dit_run, tmp_path, tiny_recipe):
    from diffit_toolkit.build import load_recipe

    # a process diffusers cannot sample the same way: EDM preconditioning
    path = tiny_recipe(tmp_path, "edm", max_steps=1)
    data = yaml.safe_load(path.read_text())
    data["model"].update(backbone="dit", mechanism="adaln_zero", time_feature_options={"freq_shift": 1})
    data["diffusion"] = {"process": "edm"}
    data["sample"] = {"sampler": "heun", "steps": 2}
    path.write_text(yaml.safe_dump(data))
    train(load_recipe(path), device="cpu", progress=False)
    out = RUNNER.invoke(app, ["export", str(tmp_path / "edm"), str(tmp_path / "e"), "--diffusers-pipeline"], env=WIDE)
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    assert "cannot export a run of the edm process as a diffusers DiTPipeline: the network is wrapped in EDM preconditioning" in out.output
    assert not (tmp_path / "e").exists()
    # a VAE that makes other latents
    other = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=3,
                                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    other.save_pretrained(tmp_path / "vae3")
    out = RUNNER.invoke(app, ["export", str(dit_run / "run"), str(tmp_path / "p"), "--diffusers-pipeline", "--vae",
                              str(tmp_path / "vae3")], env=WIDE)
    assert out.exit_code == 2 and "makes 3-channel latents, the model 4-channel ones" in out.output, out.output
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))
    # --vae belongs to the pipeline format
    out = RUNNER.invoke(app, ["export", str(dit_run / "run"), str(tmp_path / "q"), "--vae", str(tmp_path / "vae3")], env=WIDE)
    assert out.exit_code == 2 and "--vae is copied into a --diffusers-pipeline folder only" in out.output


def test_pipeline_check_refuses_pixel_models_and_runs_without_vae(dit_run):
    from diffit_toolkit.inference.pipeline import load_pipeline
    from diffit_toolkit.interop.diffusers_pipeline import check_pipeline

    gen = load_pipeline(dit_run / "run", device="cpu")
    assert check_pipeline(gen, None) == str(dit_run / "vae")
    gen.facts = {**gen.facts, "vae": None}
    with pytest.raises(ValueError, match="the run records no VAE and DiTPipeline decodes its latents with one: pass --vae"):
        check_pipeline(gen, None)
    gen.facts = {**gen.facts, "latent_scale": None}
    with pytest.raises(ValueError, match="this model makes 4-channel pixel images: export it with --diffusers"):
        check_pipeline(gen, None)


def test_every_export_has_a_card_with_the_runs_evaluation(dit_run, tmp_path):
    result = {"status": "done", "rows": [{"step": 3, "guidance_scale": 1.5, "fd": 12.345678, "accuracy": 0.5}]}
    (dit_run / "run" / "result.json").write_text(json.dumps(result))
    try:
        for flags, library in (([], "diffit-toolkit"), (["--diffusers"], "diffusers")):
            folder = tmp_path / f"out{len(flags)}"
            out = RUNNER.invoke(app, ["export", str(dit_run / "run"), str(folder), "--license", "mit", *flags], env=WIDE)
            assert out.exit_code == 0, out.output
            card = (folder / "README.md").read_text()
            meta = yaml.safe_load(card.split("---\n")[1])
            assert meta["library_name"] == library and meta["license"] == "mit" and meta["pipeline_tag"]
            assert "| 3 | 1.5 | 12.35 | 0.5 |" in card
            recipe = yaml.safe_load((folder / "training_recipe.yaml").read_text())
            assert recipe["name"] == "tiny_dit" and recipe["train"]["max_steps"] == 3
    finally:
        (dit_run / "run" / "result.json").unlink()
    bad = RUNNER.invoke(app, ["export", str(dit_run / "run"), str(tmp_path / "x"), "--license", "my license"], env=WIDE)
    assert bad.exit_code == 2 and "--license takes a license id without spaces" in bad.output


def test_png_dir_is_resumable_and_equals_the_npz(dit_run, tmp_path):
    from PIL import Image

    args = ["sample", str(dit_run / "run"), "-n", "5", "--batch-size", "2", "--steps", "2", "--classes", "3,9",
            "--device", "cpu", "--no-progress"]
    out = RUNNER.invoke(app, [*args, "--png-dir", str(tmp_path / "png"), "--npz", str(tmp_path / "s.npz")], env=WIDE)
    assert out.exit_code == 0, out.output
    names = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert names == ["0000000_class3.png", "0000001_class9.png", "0000002_class3.png", "0000003_class9.png",
                     "0000004_class3.png"]
    arrays = np.load(tmp_path / "s.npz")["arr_0"]
    pngs = [np.asarray(Image.open(tmp_path / "png" / n)) for n in names]
    assert all(np.array_equal(a, p) for a, p in zip(arrays, pngs))
    # a rerun draws only what is missing: the same images; more images extend the folder
    before = {n: (tmp_path / "png" / n).read_bytes() for n in names}
    (tmp_path / "png" / names[3]).unlink()
    out = RUNNER.invoke(app, [*args[:2], "-n", "6", *args[4:], "--png-dir", str(tmp_path / "png")], env=WIDE)
    assert out.exit_code == 0, out.output
    assert all((tmp_path / "png" / n).read_bytes() == b for n, b in before.items())
    assert (tmp_path / "png" / "0000005_class9.png").is_file() and not list((tmp_path / "png").glob(".*"))
    # other settings would mix two samplings in one folder: refused
    out = RUNNER.invoke(app, [*args, "--seed", "1", "--png-dir", str(tmp_path / "png")], env=WIDE)
    assert out.exit_code == 2 and "holds images drawn with other settings (seed)" in out.output, out.output
    (tmp_path / "foreign").mkdir()
    Image.fromarray(pngs[0]).save(tmp_path / "foreign" / "x.png")
    out = RUNNER.invoke(app, [*args, "--png-dir", str(tmp_path / "foreign")], env=WIDE)
    assert out.exit_code == 2 and "holds PNG files that diffit-toolkit sample did not draw" in out.output
    (tmp_path / "file").write_text("")
    out = RUNNER.invoke(app, [*args, "--png-dir", str(tmp_path / "file")], env=WIDE)
    assert out.exit_code == 2 and "is a file; give a folder" in out.output
