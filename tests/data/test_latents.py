"""Latent cache: a tiny random AutoencoderKL saved and reloaded offline, shards, flips, the recorded scale."""

from __future__ import annotations

import json
import pickle
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.data import (
    SD_VAE_LATENT_SCALE,
    DataConfig,
    ImageFolderDataset,
    LatentDataset,
    build_dataset,
    cache_latents,
    decode_latents,
    encode_images,
    encode_raw,
    load_vae,
)
from diffit_toolkit.data.latents import META_FILE

LATENT_SIDE = 8  # 16 px images, downsampling 2


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline hub semantics, and any socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_network(monkeypatch):
    _offline(monkeypatch)


@pytest.fixture(scope="module")
def cache(shared_class_folder, tiny_vae_dir, tmp_path_factory):
    """The CLI run offline on the 5-image class folder: 2 shards (3 + 2), float32 storage. Read-only."""
    out = tmp_path_factory.mktemp("cache") / "latents"
    args = ["cache-latents", str(shared_class_folder), str(out), "--vae", str(tiny_vae_dir), "--resolution", "16",
            "--batch-size", "2", "--shard-size", "3", "--dtype", "float32"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch)
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "latent scale" in result.output and "0.18215" in result.output
    return out


@pytest.fixture(scope="module")
def vae(tiny_vae_dir):
    return load_vae(str(tiny_vae_dir))


def test_cache_shapes_labels_and_meta(cache, tiny_vae_dir):
    meta = json.loads((cache / META_FILE).read_text())
    assert meta["latent_scale"] == SD_VAE_LATENT_SCALE
    assert meta["vae"] == str(tiny_vae_dir.resolve())
    assert (meta["channels"], meta["resolution"], meta["image_resolution"]) == (4, LATENT_SIDE, 16)
    assert (meta["num_classes"], meta["class_names"], meta["num_items"]) == (2, ["cats", "dogs"], 5)
    assert [s["count"] for s in meta["shards"]] == [3, 2] and meta["version"] == 1
    data = build_dataset("latents", path=str(cache))
    assert (len(data), data.channels, data.resolution, data.num_classes) == (5, 4, LATENT_SIDE, 2)
    assert data.latent_scale == SD_VAE_LATENT_SCALE and data.vae == meta["vae"]
    assert [data[i][1].item() for i in range(5)] == [0, 0, 0, 1, 1]
    x, y = data[4]
    assert x.shape == (4, LATENT_SIDE, LATENT_SIDE) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_plain_and_flipped_latents_are_the_encodings_and_scaled(cache, vae):
    source = ImageFolderDataset(json.loads((cache / META_FILE).read_text())["source"], resolution=16)
    data = LatentDataset(cache)
    x = torch.stack([source.load(i) for i in range(len(source))])  # (5, 3, 16, 16)
    raw = torch.stack([data.raw(i)[0] for i in range(len(data))])  # (5, 2, 4, 8, 8)
    torch.testing.assert_close(raw[:, 0], encode_raw(vae, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw[:, 1], encode_raw(vae, x.flip(-1)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw[:, 0], raw[:, 1])  # the flip is a different latent, not a mirrored one
    torch.testing.assert_close(data[2][0], raw[2, 0] * SD_VAE_LATENT_SCALE)
    torch.testing.assert_close(data[2][0], encode_images(vae, x[2:3])[0], rtol=1e-4, atol=1e-5)
    flipping = LatentDataset(cache, hflip=True)
    seen = {int(torch.allclose(flipping[2][0], raw[2, 1] * SD_VAE_LATENT_SCALE)) for _ in range(30)}
    assert seen == {0, 1}


def test_decode_divides_out_the_recorded_scale(cache, vae):
    data = LatentDataset(cache)
    z = torch.stack([data[i][0] for i in range(2)])  # scaled, as the model sees them
    raw = torch.stack([data.raw(i)[0][0] for i in range(2)])
    images = decode_latents(vae, z, data.latent_scale)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)
    wrong = decode_latents(vae, z, 1.0)
    assert not torch.allclose(wrong, expected, atol=1e-3)  # the test notices a forgotten scale


def test_rerun_resumes_complete_shards_and_replaces_damaged_ones(cache, shared_class_folder, tiny_vae_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    first, second = copy / "shard-00000.safetensors", copy / "shard-00001.safetensors"
    first_time = first.stat().st_mtime_ns
    second_tensors = {name: t.clone() for name, t in load_file(second).items()}  # load_file may memory-map
    second.write_bytes(b"interrupted")  # a damaged shard is encoded again
    cache_latents(shared_class_folder, copy, str(tiny_vae_dir), resolution=16, batch_size=2, shard_size=3, dtype="float32")
    assert first.stat().st_mtime_ns == first_time  # complete shard kept
    for name, tensor in load_file(second).items():
        torch.testing.assert_close(tensor, second_tensors[name])
    assert not list(copy.glob("*.tmp")) and len(LatentDataset(copy)) == 5


def test_flat_half_precision_sampled_cache(shared_class_folder, tiny_vae_dir, tmp_path, no_network):
    meta = cache_latents(shared_class_folder, tmp_path / "flat", str(tiny_vae_dir), resolution=16, conditional=False, sample=True, seed=1)
    data = DataConfig(kind="latents", path=str(tmp_path / "flat"), resolution=16).build()  # image side accepted too
    assert meta.num_classes == 0 and meta.stored == "sample" and data.num_classes == 0
    assert data.raw(0)[0].dtype == torch.float16 and {data[i][1].item() for i in range(5)} == {0}


def test_cache_errors(cache, tmp_path, shared_class_folder, no_network):
    with pytest.raises(ValueError, match="holds 8x8 latents of 16px images, not resolution=32"):
        LatentDataset(cache, resolution=32)
    with pytest.raises(ValueError, match="no meta.json in .*cache-latents"):
        build_dataset("latents", path=str(tmp_path))
    missing = CliRunner().invoke(app, ["cache-latents", str(shared_class_folder), str(tmp_path / "o"), "--vae", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "VAE folder" in missing.output and "does not exist" in missing.output


def test_a_wrong_vae_is_reported_before_the_image_folder_is_read(tmp_path, monkeypatch):
    import diffit_toolkit.data.cache as cache_module

    scanned = []
    monkeypatch.setattr(cache_module, "ImageFolderDataset", lambda *a, **k: scanned.append(a) or 1 / 0)
    args = ["cache-latents", str(tmp_path / "no-images"), str(tmp_path / "o"), "--vae", str(tmp_path / "no-vae")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2 and result.output.count("\n") == 1  # one line, a usage error
    assert "VAE folder" in result.output and "no-vae" in result.output and "does not exist" in result.output
    assert scanned == [] and not (tmp_path / "o").exists()  # the folder was never scanned, nothing written


def test_uncached_hub_id_fails_fast_offline_with_a_download_hint(no_network, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ValueError, match=r"VAE 'stabilityai/sd-vae-ft-ema' is not in the local Hugging Face cache.*huggingface-cli download stabilityai/sd-vae-ft-ema") as info:
        load_vae("stabilityai/sd-vae-ft-ema")
    assert "\n" not in str(info.value)


def test_dataset_pickles_for_dataloader_workers_after_use(cache):
    data = LatentDataset(cache)
    x0 = data[4][0]  # opens a shard's memory map
    clone = pickle.loads(pickle.dumps(data))
    assert clone._handles == {} and torch.equal(clone[4][0], x0)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", "link"])
def test_a_meta_json_that_points_a_shard_outside_the_cache_is_refused(cache, tmp_path, name):
    import shutil

    copy = tmp_path / "latents"
    shutil.copytree(cache, copy)
    meta = json.loads((copy / META_FILE).read_text())
    if name == "link":  # a shard that is a link to a file elsewhere
        first = meta["shards"][0]["file"]
        (copy / first).unlink()
        (copy / first).symlink_to("/etc/hostname")
        name = first
    meta["shards"][0]["file"] = name
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="which is not a file of the cache folder"):
        LatentDataset(copy)


def test_a_cache_naming_a_missing_vae_fails_before_training(cache, tmp_path):
    import shutil

    from diffit_toolkit.build import validate_recipe
    from diffit_toolkit.recipe import RecipeError
    from diffit_toolkit.train import train

    copy = tmp_path / "latents"
    shutil.copytree(cache, copy)
    meta = json.loads((copy / META_FILE).read_text())
    meta["vae"] = str(tmp_path / "gone_vae")
    (copy / META_FILE).write_text(json.dumps(meta))
    recipe = validate_recipe({
        "name": "latent", "output_dir": str(tmp_path / "run"),
        "model": {"backbone": "latent_diffit", "preset": None, "patch_size": 2, "hidden_size": 32, "depth": 1,
                  "num_heads": 2},
        "data": {"kind": "latents", "path": str(copy)}, "train": {"batch_size": 2, "max_steps": 2},
    })
    with pytest.raises(RecipeError, match="names the VAE folder .*gone_vae', which does not exist"):
        train(recipe, device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _flip_a_latent_byte(shard) -> None:
    """Flip one byte of a shard's tensor data: the header and the safetensors layout stay valid."""
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_a_shard_with_a_flipped_byte_is_refused_for_training_and_encoded_again_by_a_rerun(
        cache, shared_class_folder, tiny_vae_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    meta = json.loads((copy / META_FILE).read_text())
    assert all(len(shard["sha256"]) == 64 for shard in meta["shards"])
    second = copy / "shard-00001.safetensors"
    intact = {name: t.clone() for name, t in load_file(second).items()}
    _flip_a_latent_byte(second)
    assert load_file(second).keys() == {"latents", "labels"}  # still a valid safetensors file
    with pytest.raises(ValueError, match=r"latent shard '.*shard-00001.safetensors' is damaged: its content does not "
                                         r"match the checksum in meta.json \(delete the shard and re-run cache-latents") as info:
        LatentDataset(copy)
    assert "\n" not in str(info.value)
    first_time = (copy / "shard-00000.safetensors").stat().st_mtime_ns
    cache_latents(shared_class_folder, copy, str(tiny_vae_dir), resolution=16, batch_size=2, shard_size=3, dtype="float32")
    for name, tensor in load_file(second).items():  # encoded again, to the same values
        assert torch.equal(tensor, intact[name])
    assert (copy / "shard-00000.safetensors").stat().st_mtime_ns == first_time  # the intact shard was kept
    assert len(LatentDataset(copy)) == 5


def test_a_truncated_shard_is_refused_in_one_line(cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    second = copy / "shard-00001.safetensors"
    second.write_bytes(second.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard-00001.safetensors' is not a readable latent shard \(") as info:
        LatentDataset(copy)
    assert "\n" not in str(info.value)


def test_a_cache_without_checksums_is_still_read(cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    meta = json.loads((copy / META_FILE).read_text())
    for shard in meta["shards"]:
        del shard["sha256"]
    (copy / META_FILE).write_text(json.dumps(meta))
    assert len(LatentDataset(copy)) == 5


def test_cache_latents_refuses_a_huge_resolution_before_loading_anything(tmp_path, shared_class_folder, tiny_vae_dir):
    args = ["cache-latents", str(shared_class_folder), str(tmp_path / "o"), "--vae", str(tiny_vae_dir), "--resolution", "100000"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "resolution must be an image side from 1 to 4096 pixels, got 100000" in result.output
    assert not (tmp_path / "o").exists()
