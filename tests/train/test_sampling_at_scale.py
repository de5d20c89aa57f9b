"""Sampling at scale: images independent of the batch size and of the number of processes, the
.npz streamed as uint8."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.inference.export import export_model
from diffit_toolkit.inference.pipeline import Pipeline
from diffit_toolkit.inference.writers import save_npz, shard_range, write_samples
from diffit_toolkit.recipe import SampleSection, parse_recipe
from diffit_toolkit.build import build_process
from diffit_toolkit.registry import backbones


def _pipeline(sampler: str, classes: int = 3) -> Pipeline:
    torch.manual_seed(0)
    model = backbones.build("dit", None, input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1,
                            num_heads=2, num_classes=classes, learn_sigma=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    recipe = parse_recipe({"diffusion": {"process": "gaussian", "learn_sigma": True},
                           "sample": {"sampler": sampler, "steps": 5, "guidance_scale": 1.5}})
    facts = {"num_classes": classes, "channels": 1, "resolution": 8, "latent_scale": None, "vae": None}
    return Pipeline(model.eval(), build_process(recipe), recipe, facts, torch.device("cpu"))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "diffusers:DDPMScheduler"])
def test_images_do_not_depend_on_the_batch_size(sampler):
    gen = _pipeline(sampler)
    settings = gen.recipe.sample
    a, la = gen.sample(7, settings, batch_size=7, seed=4)
    b, lb = gen.sample(7, settings, batch_size=3, seed=4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # batched matmuls may round differently
    assert torch.equal(la, lb)
    seen = []
    gen.sample(7, settings, batch_size=3, seed=4, progress=seen.append)
    assert seen == [3, 6, 7]
    c, _ = gen.sample(7, settings, batch_size=7, seed=5)
    assert (a - c).abs().max() > 0.1  # another seed, other images
    one_class, _ = gen.sample(7, settings, classes=[1], batch_size=7, seed=4)
    first, _ = gen.sample(3, settings, classes=[1], batch_size=2, seed=4)
    torch.testing.assert_close(first, one_class[:3], atol=1e-5, rtol=0)  # image i: its seed, index and label only


def test_write_samples_streams_the_same_images_as_save_npz(tmp_path, monkeypatch):
    gen = _pipeline("ddim")
    images, labels = gen.sample(10, gen.recipe.sample, batch_size=4, seed=1)
    save_npz(images, labels, tmp_path / "whole.npz")
    seen = []
    written = write_samples(gen, 10, gen.recipe.sample, npz=tmp_path / "streamed.npz", grid=tmp_path / "g.png",
                            batch_size=4, seed=1, progress=seen.append)
    assert written == [tmp_path / "streamed.npz", tmp_path / "g.png"] and seen == [4, 8, 10]
    whole, streamed = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "streamed.npz")
    assert streamed["arr_0"].dtype == np.uint8 and streamed["arr_0"].shape == (10, 8, 8, 3)
    assert np.array_equal(whole["arr_0"], streamed["arr_0"]) and np.array_equal(whole["arr_1"], streamed["arr_1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "streamed.npz", "whole.npz"]  # no temporaries left
    # written again another day, the same samples give the same bytes (no file times in the archive)
    import time
    import zipfile

    monkeypatch.setattr(zipfile.time, "localtime", lambda *a: time.struct_time((2031, 5, 6, 7, 8, 10, 1, 126, 0)))
    write_samples(gen, 10, gen.recipe.sample, npz=tmp_path / "again.npz", batch_size=5, seed=1)
    assert (tmp_path / "again.npz").read_bytes() == (tmp_path / "streamed.npz").read_bytes()


def test_unconditional_npz_has_no_labels(tmp_path):
    gen = _pipeline("ddim", classes=0)
    write_samples(gen, 3, SampleSection(sampler="ddim", steps=2), npz=tmp_path / "u.npz", batch_size=2)
    assert list(np.load(tmp_path / "u.npz").keys()) == ["arr_0"]


@settings(max_examples=200, deadline=None)
@given(num=st.integers(1, 300), batch=st.integers(1, 40), world=st.integers(1, 9))
def test_the_shards_are_whole_batches_in_order_covering_every_image(num, batch, world):
    parts = [shard_range(num, batch, rank, world) for rank in range(world)]
    assert [i for part in parts for i in part] == list(range(num))
    assert all(part.start % batch == 0 for part in parts if part)  # a one-process batch is never split
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= batch  # balanced to one batch


def _ranks_in_turn(gen, tmp_path, world, **options):
    """Every rank of a ``world``-process run, called in this process: ranks 1.. first (their shards),
    then rank 0, which joins them (the barrier has nothing to wait for)."""
    results = {}
    for rank in [*range(1, world), 0]:
        results[rank] = write_samples(gen, 10, gen.recipe.sample, batch_size=3, seed=2, rank=rank, world_size=world,
                                      barrier=lambda: None, **options)
    return results


@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_joined_shards_are_the_one_process_npz(tmp_path, world):
    gen = _pipeline("ddim")
    write_samples(gen, 10, gen.recipe.sample, npz=tmp_path / "one.npz", batch_size=3, seed=2)
    out = tmp_path / "many"
    results = _ranks_in_turn(gen, tmp_path, world, npz=out / "s.npz", grid=out / "g.png")
    assert results[0] == [out / "s.npz", out / "g.png"] and all(results[r] == [] for r in range(1, world))
    one, many = np.load(tmp_path / "one.npz"), np.load(out / "s.npz")
    assert list(many.keys()) == ["arr_0", "arr_1"]
    assert np.array_equal(one["arr_0"], many["arr_0"]) and np.array_equal(one["arr_1"], many["arr_1"])
    assert sorted(p.name for p in out.iterdir()) == ["g.png", "s.npz"]  # the shards are gone


def test_an_unfinished_shard_leaves_no_npz(tmp_path):
    gen = _pipeline("ddim")
    npz = tmp_path / "s.npz"
    write_samples(gen, 10, gen.recipe.sample, npz=npz, batch_size=3, seed=2, rank=1, world_size=2, barrier=lambda: None)
    shard = tmp_path / "s.npz.rank1.arr_0.tmp"
    shard.write_bytes(shard.read_bytes()[:-100])  # rank 1 died while writing its last batch
    with pytest.raises(OSError, match="rank1.arr_0.tmp holds .* not \\(4, 8, 8, 3\\): its process did not finish it"):
        write_samples(gen, 10, gen.recipe.sample, npz=npz, batch_size=3, seed=2, rank=0, world_size=2, barrier=lambda: None)
    assert list(tmp_path.iterdir()) == []  # no .npz, half-written or whole, and no shards


def test_several_processes_need_an_npz(tmp_path):
    gen = _pipeline("ddim")
    with pytest.raises(ValueError, match="give --npz PATH"):
        write_samples(gen, 4, gen.recipe.sample, grid=tmp_path / "g.png", rank=0, world_size=2, barrier=lambda: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_sampling_on_two_gloo_processes_equals_one_process(tmp_path):
    export_model(_pipeline("ddim"), tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = ["-m", "diffit_toolkit", "sample", str(tmp_path / "model"), "-n", "10", "--batch-size", "3",
            "--seed", "2", "--device", "cpu"]
    one = subprocess.run([sys.executable, *args, "--npz", str(tmp_path / "one.npz")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    out = tmp_path / "two"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                          *args, "--npz", str(out / "s.npz"), "--out", str(out / "g.png")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = np.load(tmp_path / "one.npz"), np.load(out / "s.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert sorted(p.name for p in out.iterdir()) == ["g.png", "s.npz"]  # one .npz, one grid, no shards
    assert two.stdout.count("wrote") == 2  # rank 0 reports; rank 1 writes nothing of its own


@pytest.mark.parametrize(("device", "world", "expected"), [("cuda:1", 1, 1), ("cuda", 1, 0), ("cuda:1", 2, 0)])
def test_a_single_process_keeps_the_gpu_it_was_given(monkeypatch, device, world, expected):
    import diffit_toolkit.train.distributed as distributed

    chosen = []
    monkeypatch.setattr(distributed, "parse_device", lambda name: torch.device(name))  # no GPU here: accept the name
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group is started
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    env = distributed.setup_distributed(device)
    assert env.device == torch.device("cuda", expected) and chosen == [expected]  # under torchrun: cuda:LOCAL_RANK


def test_two_samplings_to_one_npz_never_mix(tmp_path, tiny_recipe):
    """Two real ``sample --npz`` processes with different seeds writing the same path at once:
    the file is whole, and exactly one of the two (the last renamed); no temporary file is left."""
    import os
    import subprocess
    import sys

    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.train import train

    train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=1)), device="cpu", progress=False)
    out = tmp_path / "out"
    out.mkdir()

    def command(seed: int, npz: Path) -> list[str]:
        return [sys.executable, "-m", "diffit_toolkit.cli", "sample", str(tmp_path / "run"), "--num", "200",
                "--batch-size", "20", "--steps", "3", "--seed", str(seed), "--npz", str(npz), "--device", "cpu",
                "--no-progress"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command(seed, out / "s.npz"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for seed in (1, 2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for seed in (1, 2):
        assert subprocess.run(command(seed, tmp_path / f"alone{seed}.npz"), env=env).returncode == 0
    both = np.load(out / "s.npz")
    alone = [np.load(tmp_path / f"alone{seed}.npz") for seed in (1, 2)]
    assert any(np.array_equal(both["arr_0"], a["arr_0"]) and np.array_equal(both["arr_1"], a["arr_1"]) for a in alone)
    assert [p.name for p in out.iterdir()] == ["s.npz"]


def test_labels_are_made_per_batch_not_for_every_image_up_front():
    gen = _pipeline("ddim")
    batches = gen.batches(10**12, gen.recipe.sample, classes=[1, 2], batch_size=4, seed=0,
                          images=range(10**12 - 5, 10**12))
    _, labels = next(batches)  # would need terabytes if every label were made first
    assert labels.tolist() == [2, 1, 2, 1]  # image i asks for classes[i % 2]
    assert gen.labels([1, 2], 5).tolist() == [1, 2, 1, 2, 1]
