"""diffusers' own ``DiTTransformer2DModel`` (small, random weights) and the toolkit's DiT agree."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.interop.diffusers_dit import save_diffusers_dit, to_diffusers_dit
from diffit_toolkit.interop.released import load_released

diffusers = pytest.importorskip("diffusers")


def _diffusers_dit(norm_eps: float = 1e-6, learn_sigma: bool = True, activation_fn: str = "gelu-approximate"):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8 if learn_sigma else 4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=norm_eps,
        activation_fn=activation_fn,
    ).eval()
    with torch.no_grad():  # random weights everywhere, the same embedders in every block (as converted DiT)
        for name, p in model.named_parameters():
            if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                continue
            p.copy_(0.1 * torch.randn_like(p))
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 421, 999]), torch.tensor([1, 9, 10])  # 10: null


def test_diffusers_dit_state_dict_imports_equal():
    theirs = _diffusers_dit()
    ours = load_released(theirs.state_dict(), input_size=8, num_heads=2).eval()
    assert ours.config["backbone"] == "dit" and ours.config["num_classes"] == 10 and ours.learn_sigma
    x, t, y = _inputs()
    with torch.no_grad():
        expected = theirs(x, t, y).sample
        got = ours(x, t, y)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert expected.abs().mean() > 0.05  # a non-trivial output (no zero-initialised layer left)


def test_diffusers_dit_folder_imports_and_exports_back(tmp_path):
    theirs = _diffusers_dit(learn_sigma=False)
    theirs.save_pretrained(tmp_path / "diffusers_dit")
    ours = load_released(tmp_path / "diffusers_dit").eval()  # config.json: sample size and heads
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), theirs(x, t, y).sample, atol=2e-5, rtol=1e-4)
    save_diffusers_dit(ours, tmp_path / "back")
    again = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    for key, value in theirs.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(again(x, t, y).sample, theirs(x, t, y).sample)


def test_wrong_time_features_are_detected_and_refused():
    """The check can fail: a DiT with the toolkit's default time features is not diffusers' model."""
    theirs = _diffusers_dit()
    wrong = load_released(theirs.state_dict(), input_size=8, num_heads=2, time_feature_options={}).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        assert (wrong(x, t, y) - theirs(x, t, y).sample).abs().max() > 1e-3
    with pytest.raises(ValueError, match="freq_shift: 1"):
        to_diffusers_dit(wrong)


def test_diffusers_default_norm_eps_agrees_to_rounding():
    theirs = _diffusers_dit(norm_eps=1e-5)
    ours = load_released(theirs.state_dict(), input_size=8, num_heads=2).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), theirs(x, t, y).sample, atol=1e-3, rtol=1e-3)


def test_differing_block_embedders_are_refused():
    theirs = _diffusers_dit()
    state = dict(theirs.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="block 1's norm1.emb.timestep_embedder.linear_1 differs"):
        load_released(state, input_size=8, num_heads=2)


def test_sample_cli_from_diffusers_folder_and_export_back(tmp_path):
    import numpy as np
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app

    theirs = _diffusers_dit(learn_sigma=False)
    theirs.save_pretrained(tmp_path / "dd")
    runner = CliRunner()
    # a latent model: without a VAE the sampler says how to decode
    out = runner.invoke(app, ["sample", str(tmp_path / "dd"), "--num", "2", "--steps", "2", "--device", "cpu"],
                        env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "pass --vae" in out.output
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    out = runner.invoke(app, ["sample", str(tmp_path / "dd"), "--vae", str(tmp_path / "vae"), "--num", "3",
                              "--classes", "4", "--steps", "2", "--sampler", "ddim", "--device", "cpu",
                              "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "s.png")], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    arrays = np.load(tmp_path / "s.npz")
    assert arrays["arr_0"].shape == (3, 8, 8, 3) and arrays["arr_1"].tolist() == [4, 4, 4]



def test_exact_gelu_diffusers_folder_is_refused_by_convert_and_sample(tmp_path):
    """diffusers' activation_fn "gelu" is the exact erf GELU; the toolkit's DiT computes the tanh
    GELU ("gelu-approximate"). Such a folder converts to another function, so convert and sample
    refuse it with one line instead."""
    import json

    from typer.testing import CliRunner

    from diffit_toolkit.cli import app

    theirs = _diffusers_dit(activation_fn="gelu")
    theirs.save_pretrained(tmp_path / "exact")
    config = json.loads((tmp_path / "exact" / "config.json").read_text())
    assert config["activation_fn"] == "gelu"
    # the check can fail: read as if it were the tanh GELU, the import is the tanh-GELU model with
    # these weights, not this one
    (tmp_path / "relabelled").mkdir()
    (tmp_path / "relabelled" / "config.json").write_text(json.dumps({**config, "activation_fn": "gelu-approximate"}))
    (tmp_path / "relabelled" / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "exact" / "diffusion_pytorch_model.safetensors").read_bytes())
    wrong = load_released(tmp_path / "relabelled").eval()
    x, t, y = _inputs()
    tanh = _diffusers_dit(activation_fn="gelu-approximate")
    tanh.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(wrong(x, t, y), tanh(x, t, y).sample, atol=1e-6, rtol=1e-6)
        assert (wrong(x, t, y) - theirs(x, t, y).sample).abs().max() > 3e-5

    runner = CliRunner()
    expected = (f"{tmp_path / 'exact' / 'config.json'} has activation_fn 'gelu' (exact erf GELU): the toolkit's DiT "
                f"uses the tanh-approximated GELU ('gelu-approximate')")
    out = runner.invoke(app, ["convert", str(tmp_path / "exact"), str(tmp_path / "o.safetensors")], env={"COLUMNS": "300"})
    assert out.exit_code == 2 and expected in out.output and "use this one with diffusers" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()
    out = runner.invoke(app, ["sample", str(tmp_path / "exact"), "--num", "1", "--steps", "1", "--device", "cpu",
                              "--npz", str(tmp_path / "s.npz")], env={"COLUMNS": "300"})
    assert out.exit_code == 2 and expected in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "s.npz").exists()


def _tiny_vae():
    return diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


def test_fp16_variant_folder_converts_exactly_and_samples(tmp_path):
    """A folder written with save_pretrained(variant="fp16") holds only
    diffusion_pytorch_model.fp16.safetensors: convert and sample read it (in float32, the stored
    values), equal to diffusers loading that variant in float32."""
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app
    from diffit_toolkit.runs.model_file import load_model_file

    _diffusers_dit(learn_sigma=False).half().save_pretrained(tmp_path / "v", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float32).eval()
    runner = CliRunner()
    out = runner.invoke(app, ["convert", str(tmp_path / "v"), str(tmp_path / "o.safetensors")], env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    ours = load_model_file(tmp_path / "o.safetensors").eval()
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), theirs(x, t, y).sample, atol=2e-5, rtol=1e-4)
    _tiny_vae().save_pretrained(tmp_path / "vae")
    out = runner.invoke(app, ["sample", str(tmp_path / "v"), "--vae", str(tmp_path / "vae"), "--num", "2", "--steps", "2",
                              "--device", "cpu", "--npz", str(tmp_path / "s.npz")], env={"COLUMNS": "300"})
    assert out.exit_code == 0, (out.output, out.exception)


def test_pipeline_folder_points_to_its_transformer_folder(tmp_path):
    """convert and sample of a DiTPipeline folder (model_index.json, transformer/, vae/) name its
    transformer folder (and its VAE for sample), not a checkpoint's step_* folder; the advice works."""
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app

    pipe = diffusers.DiTPipeline(transformer=_diffusers_dit(learn_sigma=False), vae=_tiny_vae(),
                                 scheduler=diffusers.DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    root = tmp_path / "pipe"
    expected = (f"error: {root} is a diffusers pipeline folder (model_index.json), not a model folder: pass its "
                f"transformer folder {root / 'transformer'} (to sample, add --vae {root / 'vae'})")
    runner = CliRunner()
    for args in (["convert", str(root), str(tmp_path / "o.safetensors")],
                 ["sample", str(root), "--num", "1", "--steps", "1", "--device", "cpu", "--npz", str(tmp_path / "s.npz")]):
        out = runner.invoke(app, args, env={"COLUMNS": "300"})
        assert out.exit_code == 2 and out.output.strip().splitlines() == [expected], out.output
        assert "step_" not in out.output
    out = runner.invoke(app, ["sample", str(root / "transformer"), "--vae", str(root / "vae"), "--num", "1", "--steps",
                              "2", "--device", "cpu", "--npz", str(tmp_path / "s.npz")], env={"COLUMNS": "300"})
    assert out.exit_code == 0, (out.output, out.exception)


def test_pickled_sharded_and_several_variant_weights_say_what_was_found(tmp_path):
    model = _diffusers_dit(learn_sigma=False)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(ValueError, match=r"holds diffusion_pytorch_model\.bin \(pickled weights\), which the toolkit "
                                         r"does not read: save the model again as safetensors"):
        load_released(tmp_path / "bin")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    with pytest.raises(ValueError, match="holds sharded diffusers weights"):
        load_released(tmp_path / "shards")
    model.save_pretrained(tmp_path / "two", variant="fp16")
    model.save_pretrained(tmp_path / "two", variant="bf16")
    with pytest.raises(ValueError, match=r"several variant weights files \(diffusion_pytorch_model\.bf16\.safetensors, "
                                         r"diffusion_pytorch_model\.fp16\.safetensors\)"):
        load_released(tmp_path / "two")


def test_sample_cli_npz_declares_the_side_an_upsampling_vae_decodes_to(tmp_path):
    """sample MODEL --vae VAE --npz: the .npz header holds the decoded side (8 latent -> 16 pixels
    with a two-block VAE), which np.load (and the ADM evaluator) read from it."""
    import numpy as np
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app

    _diffusers_dit(learn_sigma=False).save_pretrained(tmp_path / "dd")
    diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4, layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    out = CliRunner().invoke(app, ["sample", str(tmp_path / "dd"), "--vae", str(tmp_path / "vae"), "--num", "3", "--steps",
                                   "2", "--sampler", "ddim", "--device", "cpu", "--npz", str(tmp_path / "s.npz")],
                             env={"COLUMNS": "300"})
    assert out.exit_code == 0, out.output
    with np.load(tmp_path / "s.npz") as arrays:
        assert arrays["arr_0"].shape == (3, 16, 16, 3) and arrays["arr_1"].shape == (3,)
