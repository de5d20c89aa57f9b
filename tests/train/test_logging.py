"""Run logging: rank 0 only, optional back-ends found and reported in one message style."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from lightning_utilities.core.imports import RequirementCache
from lightning_utilities.core.rank_zero import rank_zero_only

from diffit_toolkit import optional
from diffit_toolkit.optional import MissingDependencyError, missing, require
from diffit_toolkit.train.logging import RunLogger

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_every_optional_dependency_has_an_extra_and_one_message_style(monkeypatch):
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert set(optional.OPTIONAL) == {"xformers", "triton", "tensorboard", "wandb", "hypothesis", "submitit"}
    for name, (_, extra) in optional.OPTIONAL.items():
        assert extra in extras, f"no [{extra}] extra for {name}"
    monkeypatch.setitem(optional.OPTIONAL, "wandb", (RequirementCache("no-such-package-here"), "wandb"))
    assert missing("wandb") == "wandb is not installed: pip install 'diffit-toolkit[wandb]'"
    with pytest.raises(MissingDependencyError) as err:
        require("wandb", "logging.wandb")
    assert str(err.value) == "logging.wandb needs wandb, which is not installed: pip install 'diffit-toolkit[wandb]'"
    assert missing("tensorboard") is None  # installed with [dev]


def test_the_run_logger_writes_on_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    logger = RunLogger(tmp_path / "other", total_steps=2, start_step=0, batch_size=4, show_progress=False)
    logger.step(1, 0.5, log=True, lr=1e-3)
    logger.close()
    assert not (tmp_path / "other").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    logger = RunLogger(tmp_path / "main", total_steps=2, start_step=0, batch_size=4, show_progress=False)
    logger.step(1, 0.5, log=True, lr=1e-3)
    logger.close()
    assert (tmp_path / "main" / "metrics.jsonl").read_text().count("\n") == 1


def test_without_tensorboard_the_run_logs_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    monkeypatch.setitem(optional.OPTIONAL, "tensorboard", (RequirementCache("no-such-package-here"), "tensorboard"))
    with pytest.warns(UserWarning, match=r"TensorBoard logging is off: tensorboard is not installed: "
                                         r"pip install 'diffit-toolkit\[tensorboard\]'"):
        logger = RunLogger(tmp_path, total_steps=2, start_step=0, batch_size=4, show_progress=False)
    logger.step(1, 0.5, log=True)
    logger.close()
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


def _tensorboard_events(folder: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return {"scalars": events.Tags()["scalars"], "images": events.Tags()["images"],
            "lr": [e.value for e in events.Scalars("train/lr")] if "train/lr" in events.Tags()["scalars"] else []}


def test_tensorboard_gets_the_learning_rate_and_the_sample_grids(tmp_path, tiny_recipe):
    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.train import train

    train(load_recipe(tiny_recipe(tmp_path, "run", max_steps=2, sample_every=1)), device="cpu", progress=False)
    events = _tensorboard_events(tmp_path / "run" / "tensorboard")
    assert events["images"] == ["samples"]
    import json

    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(events["lr"]) == 2 and events["lr"] == pytest.approx(logged)
    assert {"train/loss", "train/grad_norm", "train/it_per_s"} <= set(events["scalars"])


def test_a_logging_back_end_that_is_not_installed_is_a_recipe_error(tmp_path, monkeypatch, tiny_recipe):
    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.recipe import RecipeError

    monkeypatch.setitem(optional.OPTIONAL, "wandb", (RequirementCache("no-such-package-here"), "wandb"))
    with pytest.raises(RecipeError, match=r"^recipe error at logging.wandb: needs wandb, which is not installed: "
                                          r"pip install 'diffit-toolkit\[wandb\]', or remove logging.wandb$"):
        load_recipe(tiny_recipe(tmp_path, "run"), ["logging.wandb.project=demo"])


wandb_installed = pytest.mark.skipif(missing("wandb") is not None, reason="wandb is not installed (the [wandb] extra)")


@wandb_installed
def test_wandb_offline_gets_metrics_config_and_grids_and_resumes_the_same_run(tmp_path, tiny_recipe, monkeypatch):
    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.train import train

    monkeypatch.setenv("WANDB_SILENT", "true")
    path = tiny_recipe(tmp_path, "run", max_steps=3, sample_every=2)
    overrides = ["logging.wandb.project=demo", "logging.wandb.mode=offline"]
    train(load_recipe(path, overrides), device="cpu", progress=False, stop_after=2)
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    train(load_recipe(path, overrides), device="cpu", progress=False)
    assert (tmp_path / "run" / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # one folder per invocation, one W&B run id
    files = [p for run in runs for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # the offline log that `wandb sync` uploads
    assert any(p.suffix == ".png" and "samples" in p.name for p in files)  # the grids


@wandb_installed
def test_wandb_online_without_an_api_key_stops_before_training_with_one_line(tmp_path, tiny_recipe):
    path = tiny_recipe(tmp_path, "run", max_steps=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / ".netrc"), WANDB_SILENT="true")
    result = subprocess.run([sys.executable, "-m", "diffit_toolkit.cli", "train", str(path), "--device", "cpu",
                             "--set", "logging.wandb.project=demo", "--set", "logging.wandb.mode=online"],
                            capture_output=True, text=True, env=env, timeout=300)
    output = " ".join((result.stdout + result.stderr).split())  # the terminal may wrap the line
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "logging.wandb: W&B could not start (No API key configured" in output
    assert "logging.wandb.mode=offline" in output
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first step


@wandb_installed
def test_wandb_online_with_its_server_unreachable_stops_after_the_timeout_with_one_line(tmp_path, tiny_recipe, monkeypatch):
    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.recipe import RecipeError
    from diffit_toolkit.train import logging as run_logging, train

    monkeypatch.setattr(run_logging, "WANDB_INIT_TIMEOUT", 3.0)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens, connections are refused
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    recipe = load_recipe(tiny_recipe(tmp_path, "run", max_steps=2), ["logging.wandb.project=demo", "logging.wandb.mode=online"])
    with pytest.raises(RecipeError, match=r"^recipe error at logging\.wandb: W&B could not start \(.*\); "
                                          r"set WANDB_API_KEY or run `wandb login`, or set logging\.wandb\.mode=offline"):
        train(recipe, device="cpu", progress=False)



def test_the_eta_reads_at_a_glance_and_comes_from_the_mean_rate(tmp_path, capsys):
    from diffit_toolkit.train.logging import format_eta

    assert [format_eta(s) for s in (-1, 0, 42.4, 59.6, 90, 3599, 3600, 7560)] == [
        "0 s", "0 s", "42 s", "60 s", "1.5 min", "60.0 min", "1.0 h", "2.1 h"]
    logger = RunLogger(tmp_path, total_steps=100, start_step=0, batch_size=4, show_progress=False)
    logger.t0 -= 10.0  # ten steps in the ten seconds since the start: 90 left at 1 it/s
    logger.step(10, loss=1.0, log=True)
    logger.close()
    assert "eta 1.5 min" in capsys.readouterr().err
