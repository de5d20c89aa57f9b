"""The trainer: exact resume, two-process DDP on CPU, checkpoints that survive a kill."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffit_toolkit.inference.pipeline import load_pipeline
from diffit_toolkit.inference.writers import save_npz
from diffit_toolkit.build import load_recipe
from diffit_toolkit.runs import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from diffit_toolkit.registry import PLUGINS_ENV, PluginSystem, use_plugin_system
from diffit_toolkit.recipe import RecipeError
from diffit_toolkit.train import train

#: A process whose noise is a function of each sample, so a batch's loss is the same however
#: the batch is split; with label dropout off, k micro-batches then equal one batch up to rounding.
PER_SAMPLE = Path(__file__).with_name("per_sample_noise.py")
SPLIT_FREE = ["diffusion.process=per_sample_noise", "model.class_dropout_prob=0"]

def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize(("stop_at", "accum"), [(3, 1), (5, 1), (3, 4)])  # 5 = exactly the end of an epoch (1437 // 256 = 5 batches)
def test_resume_equals_training_straight_through(tmp_path, stop_at, accum, tiny_recipe):
    straight = train(load_recipe(tiny_recipe(tmp_path, "straight", batch_size=256, max_steps=8, grad_accum_steps=accum)),
                     device="cpu", progress=False)
    path = tiny_recipe(tmp_path, "resumed", batch_size=256, max_steps=8, grad_accum_steps=accum)
    first = train(load_recipe(path), device="cpu", progress=False, stop_after=stop_at)
    assert first.step == stop_at and first.grid is None
    assert [c.name for c in list_checkpoints(tmp_path / "resumed")] == [f"step_{stop_at:07d}"]
    second = train(load_recipe(path), device="cpu", progress=False)  # auto-resumes from the run folder
    assert second.step == 8
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 8
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    for name, tensor in straight.ema.state_dict().items():
        assert torch.equal(tensor, second.ema.state_dict()[name]), name
    assert straight.grid is not None and straight.grid.is_file() and straight.loss_curve.is_file()


def test_checkpoint_contents_load_without_pickled_code(tmp_path, tiny_recipe):
    result = train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=2)), device="cpu", progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["state"]["step"] == 2 and ckpt["config"]["model"]["backbone"] == "latent_diffit"
    assert ckpt["config"]["data"]["num_classes"] == 10
    torch.load(result.checkpoint / "state.pt", weights_only=True)  # plain data only


def test_sample_from_run_writes_grid_and_adm_npz(tmp_path, tiny_recipe):
    train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=2)), device="cpu", progress=False)
    gen = load_pipeline(tmp_path / "run", device="cpu")
    images, labels = gen.sample(12, gen.recipe.sample, classes=[3, 7], batch_size=5, seed=1)
    assert images.shape == (12, 1, 8, 8) and labels.tolist() == [3, 7] * 6  # classes take turns
    again, _ = gen.sample(12, gen.recipe.sample, classes=[3, 7], batch_size=5, seed=1)
    assert torch.equal(images, again)  # seeded
    path = save_npz(images, labels, tmp_path / "s.npz")
    import numpy as np

    arrays = np.load(path)
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (12, 8, 8, 3)
    assert arrays["arr_1"].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="class 12 is not one of the model's 10 classes"):
        gen.labels([12], 4)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def split_free(monkeypatch):
    """A plugin system with the per-sample-noise process registered (also for torchrun workers)."""
    monkeypatch.setenv(PLUGINS_ENV, str(PER_SAMPLE))
    with use_plugin_system(PluginSystem()):
        yield


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_give_the_weights_of_one_batch(tmp_path, accum, tiny_recipe, split_free):
    one = train(load_recipe(tiny_recipe(tmp_path, "one", max_steps=4), SPLIT_FREE), device="cpu", progress=False)
    split = train(load_recipe(tiny_recipe(tmp_path, "split", max_steps=4, grad_accum_steps=accum), SPLIT_FREE),
                  device="cpu", progress=False)
    assert_close_weights(one.model.state_dict(), split.model.state_dict())
    # the logged loss and gradient norm are those of the whole batch (each slice's loss is scaled by 1/k)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "split"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_micro_batches_that_do_not_divide_the_batch_are_a_recipe_error(tmp_path, tiny_recipe):
    with pytest.raises(RecipeError, match="train.grad_accum_steps: 64 images per process .* choose a divisor of 64"):
        train(load_recipe(tiny_recipe(tmp_path, "run", grad_accum_steps=3)), device="cpu", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path, "ddp", max_steps=4, batch_size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(Path(__file__).with_name("ddp_worker.py")), str(recipe), str(tmp_path / "ddp"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1  # identical weights on both ranks
    # rank 0 alone wrote the run folder: one metrics line per step, one checkpoint
    assert [s for s, _ in losses(tmp_path / "ddp")] == [1, 2, 3, 4]
    assert [c.name for c in list_checkpoints(tmp_path / "ddp")] == ["step_0000004"]


def test_two_process_ddp_with_micro_batches_syncs_once_per_step(tmp_path, tiny_recipe, split_free):
    # 2 processes x 2 micro-batches of 16 = the single-process batch of 64, the same samples
    reference = train(load_recipe(tiny_recipe(tmp_path, "one", max_steps=4), SPLIT_FREE), device="cpu", progress=False)
    recipe = tiny_recipe(tmp_path, "ddp", max_steps=4, batch_size=64, grad_accum_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(Path(__file__).with_name("ddp_worker.py")), str(recipe), str(tmp_path / "ddp"), str(tmp_path), *SPLIT_FREE]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len({(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}) == 1
    # no_sync on the first micro-batch: one all-reduce (one bucket: a tiny model) per step, not two
    assert [(tmp_path / f"allreduces{r}.txt").read_text() for r in (0, 1)] == ["4", "4"]
    trained = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))["model"]
    assert_close_weights(reference.model.state_dict(), trained)


KILLER = """
import sys, torch
from diffit_toolkit.runs.checkpoint import save_checkpoint
big = {"w": torch.randn(4_000_000)}
step = 1
while True:
    save_checkpoint(sys.argv[1], step, big, big, {"step": step}, {"step": step}, keep_last=2)
    print(step, flush=True)
    step += 1
"""


@pytest.mark.parametrize("delay", [0.3, 0.55, 0.8])
def test_kill_during_checkpoint_writing_leaves_the_previous_one_loadable(tmp_path, delay):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # at least one checkpoint is complete
    assert first.strip() == "1"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = latest_checkpoint(tmp_path / "run")
    ckpt = load_checkpoint(newest)
    assert ckpt["state"]["step"] == ckpt["config"]["step"] == int(newest.name.split("_")[1])
    assert ckpt["model"]["w"].shape == (4_000_000,)


def test_a_failing_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    state = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, 1, state, state, {"step": 1}, {}, keep_last=3)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffit_toolkit.runs.checkpoint.save_file", full_disk)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path, 2, state, state, {"step": 2}, {}, keep_last=3)
    assert "No space left on device" in str(err.value) and "step_0000001 is intact" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["model"]["w"], torch.ones(3))


def test_sample_and_recipe_commands(tmp_path, tiny_recipe):
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app

    runner = CliRunner()
    recipe = tiny_recipe(tmp_path, "run", max_steps=1)
    shown = runner.invoke(app, ["recipe", "show", str(recipe), "--set", "train.lr=0.5"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "lr: 0.5" in shown.output
    bad = runner.invoke(app, ["recipe", "validate", str(recipe), "--set", "train.lrr=1"], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "recipe error at train.lrr: unknown key; did you mean 'lr'?" in bad.output
    assert runner.invoke(app, ["train", str(recipe), "--device", "cpu", "--no-progress"]).exit_code == 0
    out = runner.invoke(app, ["sample", str(tmp_path / "run"), "--num", "6", "--classes", "1,2", "--steps", "2",
                              "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "g.png").is_file()
    import numpy as np

    assert np.load(tmp_path / "s.npz")["arr_1"].tolist() == [1, 2, 1, 2, 1, 2]
    missing = runner.invoke(app, ["sample", str(tmp_path / "run"), "--classes", "12", "--device", "cpu"], env={"COLUMNS": "300"})
    assert missing.exit_code == 2 and "class 12 is not one of the model's 10 classes" in missing.output


def test_train_on_a_finished_run_says_it_ran_nothing(tmp_path, tiny_recipe):
    from typer.testing import CliRunner

    from diffit_toolkit.cli import app

    recipe = tiny_recipe(tmp_path, "run", max_steps=2)
    first = CliRunner().invoke(app, ["train", str(recipe), "--device", "cpu", "--no-progress"], env={"COLUMNS": "300"})
    assert first.exit_code == 0 and "done: 2 steps (2 in this run)" in first.output, first.output
    again = CliRunner().invoke(app, ["train", str(recipe), "--device", "cpu", "--no-progress"], env={"COLUMNS": "300"})
    assert again.exit_code == 0 and "already finished at step 2" in again.output and "done:" not in again.output


def test_an_unconditional_model_on_labelled_data_trains_and_samples_without_labels(tmp_path, tiny_recipe):
    recipe = load_recipe(tiny_recipe(tmp_path, "run", max_steps=2), ["model.num_classes=0"])
    result = train(recipe, device="cpu", progress=False)
    assert result.step == 2 and result.model.num_classes == 0
    assert load_checkpoint(result.checkpoint)["config"]["data"]["num_classes"] == 0
    gen = load_pipeline(tmp_path / "run", device="cpu")
    images, labels = gen.sample(3, gen.recipe.sample.model_copy(update={"guidance_scale": 1.0}), batch_size=3)
    assert images.shape == (3, 1, 8, 8) and labels is None


def test_a_busy_machine_gets_one_warning_about_threads(tmp_path, tiny_recipe, monkeypatch):
    import os

    from typer.testing import CliRunner

    import torch

    from diffit_toolkit.cli import app
    from diffit_toolkit.train.trainer import busy_cpu_note

    cpu = torch.device("cpu")
    assert busy_cpu_note(cpu, 2, load=4.0, cores=2) and "OMP_NUM_THREADS=1" in busy_cpu_note(cpu, 2, load=4.0, cores=2)
    assert busy_cpu_note(cpu, 2, load=1.2, cores=2) is None  # a core to spare
    assert busy_cpu_note(cpu, 1, load=9.0, cores=2) is None  # one thread does not wait for others
    assert busy_cpu_note(torch.device("cuda"), 8, load=9.0, cores=2) is None
    # through the command: the load average the machine reports decides
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    recipe = tiny_recipe(tmp_path, "run", max_steps=1)
    out = CliRunner().invoke(app, ["train", str(recipe), "--device", "cpu", "--no-progress"], env={"COLUMNS": "400"})
    assert out.exit_code == 0, out.output
    assert out.output.count("the machine is busy (load average 64.0") == 1
