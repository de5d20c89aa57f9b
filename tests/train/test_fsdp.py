"""FSDP2 (``train.strategy: fsdp``) under two gloo processes on the CPU: the weights of one
process, one gradient reduce-scatter per block and step with micro-batches, checkpoints that move
between FSDP and one process both ways, and a resume that continues like an uninterrupted run.

All FSDP runs share one torchrun launch (starting two processes costs more than the runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from filelock import FileLock
from torch.distributed.fsdp import FSDPModule

from diffit_toolkit.build import load_recipe
from diffit_toolkit.registry import PLUGINS_ENV, PluginSystem, backbones, use_plugin_system
from diffit_toolkit.runs import load_checkpoint
from diffit_toolkit.train import train
from diffit_toolkit.train.distributed import shard_model

from .test_trainer import PER_SAMPLE, SPLIT_FREE, _free_port, metrics

WORKER = Path(__file__).with_name("fsdp_worker.py")


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def assert_close(a, b, where: str = "") -> None:
    """Nested checkpoint contents equal to float rounding (tensors) or exactly (the rest)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training_state(a: Path, b: Path) -> None:
    """Weights, EMA and AdamW states (moments, step counts, groups) of two checkpoints agree."""
    one, two = load_checkpoint(a), load_checkpoint(b)
    assert_close(one["model"], two["model"], "model")
    assert_close(one["ema"], two["ema"], "ema")
    assert_close(one["state"]["optimizer"], two["state"]["optimizer"], "optimizer")
    assert one["state"]["ema_n_averaged"] == two["state"]["ema_n_averaged"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_recipe):
    """The single-process reference, every FSDP run (one launch), then a single-process run
    resumed from an FSDP checkpoint. Returns the folder holding them all; made once even when
    pytest-xdist spreads these tests over workers (the workers' temp folders share a parent)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    tmp = shared / "fsdp_runs"
    with FileLock(str(shared / "fsdp_runs.lock")):
        if not (tmp / "done").is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _train_all(tmp, tiny_recipe)
            (tmp / "done").touch()
    return tmp


def _train_all(tmp: Path, tiny_recipe) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLUGINS_ENV, str(PER_SAMPLE))
        with use_plugin_system(PluginSystem()):
            # checkpoints at steps 2, 4, 6 of one process with the whole batch of 64
            train(load_recipe(tiny_recipe(tmp, "single", max_steps=6, ckpt_every=2), SPLIT_FREE), device="cpu", progress=False)
            plan = [
                {"recipe": str(tiny_recipe(tmp, "plain", max_steps=4)), "set": SPLIT_FREE},
                {"recipe": str(tiny_recipe(tmp, "accum", max_steps=4, grad_accum_steps=2)), "set": SPLIT_FREE},
                {"recipe": str(tiny_recipe(tmp, "from_single", max_steps=6)), "set": SPLIT_FREE, "stop_after": 2,
                 "resume": str(step_dir(tmp / "single", 2))},
                # the built-in Gaussian process with label dropout: each rank's random state matters
                {"recipe": str(tiny_recipe(tmp, "straight", max_steps=4)), "set": []},
                {"recipe": str(tiny_recipe(tmp, "resumed", max_steps=4)), "set": [], "stop_after": 2},
                {"recipe": str(tiny_recipe(tmp, "resumed", max_steps=4)), "set": []},
            ]
            for i, run in enumerate(plan):
                run["report"] = str(tmp / f"report{i}")
            (tmp / "plan.json").write_text(json.dumps(plan))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                   str(WORKER), str(tmp / "plan.json")]
            proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
            assert proc.returncode == 0, proc.stderr[-3000:]
            # an FSDP checkpoint continued by one process
            train(load_recipe(tiny_recipe(tmp, "single_from_fsdp", max_steps=6), SPLIT_FREE), device="cpu", progress=False,
                  resume=step_dir(tmp / "from_single", 4))


def report(runs: Path, index: int) -> list[dict]:
    return [json.loads((runs / f"report{index}.rank{r}.json").read_text()) for r in (0, 1)]


def test_fsdp_gives_the_weights_of_one_process(runs):
    assert_same_training_state(step_dir(runs / "single", 4), step_dir(runs / "plain", 4))
    for a, b in zip(metrics(runs / "single")[:4], metrics(runs / "plain"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    ranks = report(runs, 0)
    # really sharded: the block and the root are FSDP units, each rank holds about half of every
    # parameter, the EMA is sharded alike; one reduce-scatter per unit and step
    assert all(r["fsdp_modules"] == 2 and r["ema_sharded"] and r["reduce_scatters"] == 2 * 4 for r in ranks)
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["full_numel"]
    assert max(r["local_numel"] for r in ranks) < 0.55 * ranks[0]["full_numel"]


def test_fsdp_micro_batches_give_one_batch_and_sync_once_per_step(runs):
    # 2 processes x 2 micro-batches of 16 = the single-process batch of 64, the same samples
    assert_same_training_state(step_dir(runs / "single", 4), step_dir(runs / "accum", 4))
    # set_requires_gradient_sync(False) on the first micro-batch: 2 units x 4 steps, not twice that
    assert [r["reduce_scatters"] for r in report(runs, 1)] == [8, 8]


def test_checkpoints_move_between_fsdp_and_one_process(runs):
    # one process's step-2 checkpoint continued under FSDP to step 4 ...
    assert report(runs, 2)[0]["step"] == 4
    assert_same_training_state(step_dir(runs / "single", 4), step_dir(runs / "from_single", 4))
    # ... and that FSDP checkpoint continued by one process to step 6
    assert_same_training_state(step_dir(runs / "single", 6), step_dir(runs / "single_from_fsdp", 6))


def test_fsdp_resume_continues_like_an_uninterrupted_run(runs):
    assert [r["step"] for r in report(runs, 4)] == [2, 2]
    assert_same_training_state(step_dir(runs / "straight", 4), step_dir(runs / "resumed", 4))
    assert [m["loss"] for m in metrics(runs / "straight")] == pytest.approx([m["loss"] for m in metrics(runs / "resumed")], rel=1e-5)
    # each rank's random state is in the checkpoint (label dropout and noise differ per rank)
    rng = load_checkpoint(step_dir(runs / "resumed", 2))["state"]["rng_ranks"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


TINY_BACKBONES = {  # name: (options, blocks)
    "latent_diffit": (dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10), 2),
    "dit": (dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10), 2),
    # encoder stages of 1 and 2 blocks, one decoder stage of 1
    "image_diffit": (dict(input_size=8, in_channels=1, channels=[16, 32], num_blocks=[1, 2], head_dim=8, window=4,
                          num_classes=10, time_dim=32, norm_groups=4), 4),
}


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one (FSDP then shards over a mesh of one)."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("backbone", sorted(TINY_BACKBONES))
def test_each_backbone_is_sharded_block_by_block(backbone, one_process_group):
    torch.manual_seed(0)
    options, count = TINY_BACKBONES[backbone]
    model = backbones.build(backbone, None, **options).eval()
    blocks = model.shard_units()
    block_params = {id(p) for b in blocks for p in b.parameters()}
    # the units are the blocks: every attention weight is in one of them, none is in two
    assert sum(len(list(b.parameters())) for b in blocks) == len(block_params) > 0
    assert all(id(p) in block_params for n, p in model.named_parameters() if ".attn." in n)
    assert len(blocks) == count
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 4])
    expected = model(x, t, y)
    assert shard_model(model) == len(blocks)
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in blocks)
    torch.testing.assert_close(model(x, t, y), expected)
