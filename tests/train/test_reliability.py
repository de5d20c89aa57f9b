"""Faults and bad input: nothing lost, nothing executed, every error one readable line.

Each test fails if its protection is removed (see the comment on each)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_plugins.processes import GaussianProcess
from diffit_toolkit.build import load_recipe, validate_recipe
from diffit_toolkit.recipe import RecipeError
from diffit_toolkit.runs import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from diffit_toolkit.train import TrainingError, train

def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Every run a resume-exactness test compares (the uninterrupted reference, the interrupted run and
# its resumption) is a subprocess with the same environment and thread count: float reductions
# depend on the thread count and the CPU's code path, so only runs on one setup are bit-identical.
def training_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start_training(recipe: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffit_toolkit.cli", "train", str(recipe), "--device", "cpu", "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=training_env(threads))


def train_to_the_end(recipe: Path, threads: int) -> dict[str, dict[str, torch.Tensor]]:
    """Train (or resume) ``recipe`` in a subprocess until max_steps; the final model and EMA weights."""
    proc = start_training(recipe, threads)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    final = load_checkpoint(latest_checkpoint(load_recipe(recipe).run_dir))
    assert final["state"]["step"] == 30
    assert final["config"]["environment"]["threads"] == threads
    return {"model": final["model"], "ema": final["ema"]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_recipe):
    """``straight(threads)``: the reference, 30 steps without interruption, run once per thread count."""
    done: dict[int, dict] = {}

    def run(threads: int) -> dict[str, dict[str, torch.Tensor]]:
        if threads not in done:
            tmp = tmp_path_factory.mktemp(f"straight{threads}")
            done[threads] = train_to_the_end(tiny_recipe(tmp, "run", max_steps=30, batch_size=32), threads)
        return done[threads]

    return run


def assert_resumed_equals_straight(resumed: dict, straight: dict) -> None:
    assert_same_weights(resumed["model"], straight["model"])
    assert_same_weights(resumed["ema"], straight["ema"])


# Thread counts 1 and 2 are both exercised: each interrupted run is compared with the reference
# that ran with its own thread count.
@pytest.mark.parametrize(("sig", "threads"), [(signal.SIGTERM, 1), (signal.SIGUSR1, 2)])
def test_preemption_signal_checkpoints_within_a_step_and_resume_is_exact(tmp_path, sig, threads, straight, tiny_recipe, wait_for_steps):
    # protection: trainer.stop_requests + the checkpoint on stop
    recipe = tiny_recipe(tmp_path, "run", max_steps=30, batch_size=32)
    proc = start_training(recipe, threads)
    wait_for_steps(tmp_path / "run", 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    logged = len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None and int(newest.name.split("_")[1]) in (logged, logged + 1)  # within one step
    assert int(newest.name.split("_")[1]) < 30  # really interrupted
    assert f"stopped by {signal.Signals(sig).name}" in out
    assert_resumed_equals_straight(train_to_the_end(recipe, threads), straight(threads))


@pytest.mark.parametrize(("after_steps", "threads"), [(2, 1), (5, 2), (9, 1)])
def test_kill_9_at_random_moments_then_resume_is_exact(tmp_path, after_steps, threads, straight, tiny_recipe, wait_for_steps):
    # protection: atomic checkpoint folders (a kill mid-write leaves only a .tmp-* folder)
    recipe = tiny_recipe(tmp_path, "run", max_steps=30, batch_size=32, ckpt_every=1, keep_last=3)
    proc = start_training(recipe, threads)
    wait_for_steps(tmp_path / "run", after_steps, proc)
    time.sleep(0.013 * after_steps)  # land at different points of a step / a checkpoint write
    proc.kill()
    proc.wait()
    newest = latest_checkpoint(tmp_path / "run")
    assert newest is not None
    load_checkpoint(newest)  # complete and readable
    assert_resumed_equals_straight(train_to_the_end(recipe, threads), straight(threads))


def test_the_run_folder_records_the_setup_and_a_resume_on_another_says_so(tmp_path, tiny_recipe):
    # protection: environment.json and the exactness check on resume
    recipe = tiny_recipe(tmp_path, "run", max_steps=4)
    proc = start_training(recipe, 1)
    assert proc.wait(timeout=120) == 0
    first = load_checkpoint(latest_checkpoint(tmp_path / "run"))["config"]["environment"]
    assert first["threads"] == 1 and first["device"].startswith("cpu: ") and first["torch"] == torch.__version__
    proc = start_training(tiny_recipe(tmp_path, "run", max_steps=6), 2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resuming on a different setup (threads 1 -> 2)" in " ".join(out.split())
    starts = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert [(s["start_step"], s["threads"]) for s in starts] == [(0, 1), (4, 2)]


def _nan_at(monkeypatch, bad_steps: set[int]) -> None:
    original = GaussianProcess.loss
    calls = {"n": 0}

    def loss(self, model, x0, y, generator):
        calls["n"] += 1
        out = original(self, model, x0, y, generator)
        return out * float("nan") if calls["n"] in bad_steps else out

    monkeypatch.setattr(GaussianProcess, "loss", loss)


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch, tiny_recipe):
    # protection: the non-finite check before the optimizer step
    _nan_at(monkeypatch, {3, 4, 9})
    result = train(load_recipe(tiny_recipe(tmp_path, "run", ckpt_every=4)), device="cpu", progress=False)
    assert result.step == 12 and result.skipped_steps == 3
    for ckpt in list_checkpoints(tmp_path / "run"):
        for tensor in load_checkpoint(ckpt)["model"].values():
            assert torch.isfinite(tensor).all()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 3 not in steps and 4 not in steps and 12 in steps


def test_too_many_bad_steps_stop_with_the_step_and_last_good_checkpoint(tmp_path, monkeypatch, tiny_recipe):
    _nan_at(monkeypatch, set(range(6, 100)))
    with pytest.raises(TrainingError) as err:
        train(load_recipe(tiny_recipe(tmp_path, "run", ckpt_every=4, max_bad_steps=3)), device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "3 consecutive steps up to step 8" in message and "step_0000004" in message
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_0000004"]  # no NaN checkpoint


def test_out_of_memory_is_one_line_with_what_to_change(tmp_path, monkeypatch, tiny_recipe):
    # protection: the OutOfMemoryError handler in the step
    def oom(self, model, x0, y, generator):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(GaussianProcess, "loss", oom)
    result = CliRunner().invoke(app, ["train", str(tiny_recipe(tmp_path, "run")), "--device", "cpu", "--no-progress"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "out of CPU memory at step 1 with 64 images per process: lower train.batch_size" in result.output
    assert "model.grad_checkpointing" in result.output and "Traceback" not in result.output


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tiny_recipe):
    # protection: save_checkpoint writes to a temporary folder and cleans it up on error
    from diffit_toolkit.runs import checkpoint as ckpt_module

    original, calls = ckpt_module.save_file, {"n": 0}

    def fill_disk_on_second_checkpoint(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # model + ema of the first checkpoint succeed
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "save_file", fill_disk_on_second_checkpoint)
    with pytest.raises(CheckpointError, match="No space left on device.*step_0000004 is intact"):
        train(load_recipe(tiny_recipe(tmp_path, "run", ckpt_every=4)), device="cpu", progress=False)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_0000004"]
    load_checkpoint(latest_checkpoint(tmp_path / "run"))


def test_checkpoint_of_another_architecture_lists_the_mismatched_keys(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path, "run", max_steps=2)
    train(load_recipe(recipe), device="cpu", progress=False)
    with pytest.raises(CheckpointError) as err:
        train(load_recipe(recipe, ["model.hidden_size=48"]), device="cpu", progress=False)
    assert "\n" not in str(err.value)
    assert "mis-shaped" in str(err.value) and "in file vs" in str(err.value)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, tiny_recipe):
    # protection: torch.load(weights_only=True) in load_checkpoint
    result = train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=1)), device="cpu", progress=False)
    marker = tmp_path / "pwned.txt"
    with open(result.checkpoint / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "payload": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match="could not read checkpoint|does not match the SHA-256"):  # checksums refuse it first
        load_checkpoint(result.checkpoint)
    assert not marker.exists()


def test_yaml_tags_that_would_run_code_are_refused(tmp_path):
    # protection: yaml.safe_load
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="YAML syntax error"):
        load_recipe(path)
    assert not marker.exists()


def test_training_writes_only_inside_the_run_folder(tmp_path, monkeypatch, tiny_recipe):
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, "run", max_steps=2)
    before = {p for p in tmp_path.rglob("*")}
    train(load_recipe(recipe), device="cpu", progress=False)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(tmp_path / "run" in p.parents or p == tmp_path / "run" for p in created)


# -- recipe fuzzing: only RecipeError, never a traceback -----------------------------------------

SECTIONS = ["model", "diffusion", "data", "train", "sample", "name", "output_dir", "description", "extends", "bogus"]
KEYS = ["backbone", "preset", "mechanism", "hidden_size", "depth", "num_heads", "patch_size", "input_size",
        "window", "rel_pos_bias", "num_classes", "in_channels", "mechanism_options", "process", "schedule",
        "prediction", "learn_sigma", "precond", "kind", "path", "split", "resolution", "channels", "batch_size",
        "lr", "max_steps", "precision", "betas", "sampler", "steps", "guidance_scale", "guided_channels",
        "guidance_interval", "channels_", "xyz", "grad_clip", "ema_decay", "mlp_ratio", "final_layer"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["tmsa", "adaln_zero", "latent_diffit", "image_diffit", "dit", "S/2", "cifar10", "XL/8",
                     "digits", "gaussian", "edm", "ddim", "heun", "1e-4", "", "nope", "relative_bias", "fp16"]),
    st.text(max_size=6),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                      max_leaves=8)
RECIPES = st.dictionaries(st.sampled_from(SECTIONS), st.one_of(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6), VALUES),
                          max_size=6)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECIPES)
def test_fuzzed_recipes_give_only_recipe_errors(data):
    try:
        validate_recipe(data)
    except RecipeError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("recipe")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80))
def test_fuzzed_yaml_text_gives_only_recipe_errors(text):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text)
        try:
            load_recipe(path)
        except RecipeError as exc:
            assert "\n" not in str(exc)


def test_a_run_whose_every_step_is_non_finite_fails_even_below_the_limit(tmp_path, monkeypatch, tiny_recipe):
    _nan_at(monkeypatch, set(range(1, 100)))
    recipe = tiny_recipe(tmp_path, "run", max_steps=4, ckpt_every=0, max_bad_steps=10)
    with pytest.raises(TrainingError) as err:
        train(load_recipe(recipe), device="cpu", progress=False)
    assert "every step of this run (4, up to step 4) had a non-finite loss" in str(err.value)
    assert "\n" not in str(err.value) and list_checkpoints(tmp_path / "run") == []
