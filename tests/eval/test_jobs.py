"""Sweeps as jobs, with real processes: ``ablate --jobs 2`` and ``--launcher submitit-local`` run
each (recipe, seed) in a process of its own that loads the user's ``-p`` plugin again; a job killed
mid-run (SIGTERM to the real child process) resumes on the rerun and ends with exactly the weights
and losses of an uninterrupted twin; ``--report-only`` rebuilds the reports from the run folders."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.eval.jobs import PID_FILE, RESULT_FILE, Launcher, make_executor, read_result

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "diffit_toolkit"]
TINY = ["--set", "model.hidden_size=16", "--set", "model.depth=1", "--set", "model.num_heads=2", "--set",
        "train.batch_size=8", "--set", "train.warmup_steps=0", "--set", "train.log_every=1",
        "--num-images", "10", "--sample-steps", "2", "--device", "cpu"]

# a mechanism only a -p plugin provides, slowed down while training so that a test can stop it mid-run
SLOW_PLUGIN = '''
import os, time
from torch import nn
from diffit_toolkit import ConditioningMechanism, Injection, register_conditioning


@register_conditioning("slow_tmsa")
class SlowTMSA(ConditioningMechanism):
    def __init__(self, spec):
        super().__init__(spec)
        self.qkv_temb = nn.Linear(spec.cond_dim, 3 * spec.dim)

    def forward(self, c):
        if self.training:
            time.sleep(float(os.environ.get("SLOW_TMSA_SECONDS", "0")))
        return Injection(qkv=self.qkv_temb(c)[:, None])
'''


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """The digits judge, trained once for the module (every job folder gets a copy)."""
    from diffit_toolkit.eval.digits import DigitsMetric

    path = tmp_path_factory.mktemp("judge") / "classifier.pt"
    # the classifier is memoised per process: save it here whether or not this call trained it
    torch.save(DigitsMetric(seed=0).classifier.state_dict(), path)
    return path


def _recipes(tmp_path: Path, *names: str) -> list[str]:
    (tmp_path / "slow.py").write_text(SLOW_PLUGIN)
    paths = []
    for name in names:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"extends: {ROOT / 'recipes' / 'ablation' / 'base.yaml'}\nname: {name}\nmodel:\n  mechanism: slow_tmsa\n")
        paths.append(str(path))
    return paths


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DIFFIT_TOOLKIT_PLUGINS"}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="200", **extra)
    return env


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffit_toolkit.runs import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    return {"model": ckpt["model"], "ema": ckpt["ema"], "step": ckpt["state"]["step"]}


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_a_job_killed_mid_run_resumes_exactly_on_the_rerun(tmp_path, classifier):
    out = tmp_path / "abl"
    out.mkdir()
    shutil.copy(classifier, out / "classifier.pt")
    recipes = _recipes(tmp_path, "twin_a", "twin_b")  # the same run twice: twin_b is never interrupted
    cmd = [*CLI, "-p", str(tmp_path / "slow.py"), "ablate", *recipes, "--seeds", "0", "--set", "train.max_steps=40",
           *TINY, "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(SLOW_TMSA_SECONDS="0.05"), cwd=tmp_path)
    victim = out / "twin_a" / "seed_0"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until twin_a's own process has trained a few steps
        steps = _losses(victim) if (victim / "metrics.jsonl").is_file() else {}
        if (victim / PID_FILE).is_file() and steps and max(steps) >= 6:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    child = int((victim / PID_FILE).read_text())
    assert child != proc.pid
    os.kill(child, signal.SIGTERM)  # a real signal to the real job process (as a SLURM preemption sends)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output
    assert "error: twin_a seed 0 stopped by SIGTERM at step" in output and "Traceback" not in output, output
    stopped = json.loads((victim / "job_status.json").read_text())
    assert stopped["status"] == "stopped" and 6 <= stopped["step"] < 40
    assert read_result(victim) is None and read_result(out / "twin_b" / "seed_0") is not None
    assert "twin_b" in (out / "table.md").read_text() and "twin_a" not in (out / "table.md").read_text()
    # the same command again: twin_b is skipped, twin_a goes on from its checkpoint
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(SLOW_TMSA_SECONDS="0"), cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "twin_b seed 0: already evaluated, skipped" in again.stdout
    assert "resumed from" in (victim / "job.log").read_text() and f"at step {stopped['step']}" in (victim / "job.log").read_text()
    a, b = _final_weights(victim), _final_weights(out / "twin_b" / "seed_0")
    assert a["step"] == b["step"] == 40
    for kind in ("model", "ema"):
        assert a[kind].keys() == b[kind].keys()
        assert all(torch.equal(a[kind][k], b[kind][k]) for k in a[kind]), kind
    assert _losses(victim) == _losses(out / "twin_b" / "seed_0")  # the whole loss curve, interrupted or not
    rows = {r["recipe"]: r for r in csv.DictReader((out / "runs.csv").open())}
    assert rows["twin_a"]["fd"] == rows["twin_b"]["fd"] and rows["twin_a"]["step"] == "40"


def test_submitit_local_launcher_and_report_only(tmp_path, classifier):
    out = tmp_path / "abl"
    out.mkdir()
    shutil.copy(classifier, out / "classifier.pt")
    recipes = _recipes(tmp_path, "first", "second")
    cmd = [*CLI, "-p", str(tmp_path / "slow.py"), "ablate", *recipes, "--seeds", "3", "--set", "train.max_steps=6",
           *TINY, "--out", str(out), "--launcher", "submitit-local", "--jobs", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "submitted 2 jobs (submitit-local)" in run.stdout
    for name in ("first", "second"):
        result = json.loads((out / name / "seed_3" / RESULT_FILE).read_text())
        assert result["mechanism"] == "slow_tmsa" and result["seed"] == 3 and result["rows"][-1]["step"] == 6
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2  # each ran as a submitit job
    table = (out / "table.md").read_text()
    runs = (out / "runs.csv").read_text()
    for name in ("table.md", "runs.csv", "curves.csv", "ablation.png"):
        (out / name).unlink()
    # the reports come back from the run folders alone, nothing is trained
    rebuilt = CliRunner().invoke(app, ["-p", str(tmp_path / "slow.py"), "ablate", *recipes, "--seeds", "3", "--set",
                                       "train.max_steps=6", *TINY, "--out", str(out), "--report-only"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "table.md").read_text() == table and (out / "runs.csv").read_text() == runs
    assert (out / "ablation.png").stat().st_size > 0 and "already evaluated" not in rebuilt.output


def test_report_only_without_runs_and_bad_launchers_are_one_line_errors(tmp_path, monkeypatch):
    recipe = str(ROOT / "recipes" / "ablation" / "tmsa.yaml")
    result = CliRunner().invoke(app, ["ablate", recipe, "--out", str(tmp_path / "empty"), "--report-only"])
    assert result.exit_code == 2 and "no finished runs" in result.output and "without --report-only" in result.output
    result = CliRunner().invoke(app, ["ablate", recipe, "--launcher", "pbs"])
    assert result.exit_code == 2 and "--launcher must be one of local, slurm, submitit-local" in result.output
    result = CliRunner().invoke(app, ["ablate", recipe, "--partition", "gpu"])
    assert result.exit_code == 2 and "add --launcher slurm" in result.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    result = CliRunner().invoke(app, ["ablate", recipe, "--launcher", "slurm"])
    assert result.exit_code == 2 and "pip install 'diffit-toolkit[cluster]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_slurm_executor_gets_partition_time_gpus_and_array_parallelism(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["ablate", str(ROOT / "recipes" / "ablation" / "tmsa.yaml"), "--launcher", "slurm"])
    assert result.exit_code == 2 and "srun not found" in result.output and "submitit-local" in result.output
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/srun" if name == "srun" else real(name, *a, **k))
    executor = make_executor(Launcher(kind="slurm", jobs=3, partition="learnlab", time_min=90, gpus=2), tmp_path)
    params = executor._executor.parameters
    assert params["partition"] == "learnlab" and params["time"] == 90 and params["gpus_per_node"] == 2
    assert params["cpus_per_task"] == 20 and params["array_parallelism"] == 3 and params["signal_delay_s"] == 120
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        Launcher(jobs=0).check()


def test_a_result_made_with_other_settings_is_not_reused(tmp_path, monkeypatch):
    from diffit_toolkit.eval.ablation import AblationSuite, run_ablation
    from diffit_toolkit.eval.jobs import write_json

    suite = AblationSuite(recipes=[ROOT / "recipes" / "ablation" / "tmsa.yaml"], seeds=[0], out=tmp_path / "abl")
    run_dir = tmp_path / "abl" / "tmsa" / "seed_0"
    run_dir.mkdir(parents=True)
    write_json(run_dir / RESULT_FILE, {"key": "another", "rows": [{"recipe": "tmsa", "seed": 0, "step": 1}]})
    with pytest.raises(ValueError, match="holds a result made with other settings"):
        run_ablation(suite, log=lambda line: None)


def test_a_worker_killed_while_starting_counts_as_stopped_not_failed(tmp_path):
    from diffit_toolkit.eval.jobs import LOG_FILE, RunSpec, _read_status

    spec = RunSpec(name="tmsa", recipe="r.yaml", overrides=[], seed=0, run_dir=str(tmp_path), judge_dir=str(tmp_path))
    (tmp_path / LOG_FILE).write_text("importing\n")
    status = _read_status(spec, -signal.SIGTERM)  # no status file: the signal came before the training loop
    assert status["status"] == "stopped" and status["stopped_by"] == "SIGTERM" and status["step"] == 0
    crashed = _read_status(spec, 1)
    assert crashed["status"] == "failed" and "importing" in crashed["error"] and LOG_FILE in crashed["error"]
