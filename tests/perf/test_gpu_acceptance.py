"""``benchmarks/gpu_acceptance.py`` in its tiny CPU mode, as real subprocesses: every part runs (or
is skipped with its reason), the JSON and the Markdown have their shape, and a part that raises or
runs past its timeout is recorded with its reason while the others still run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


acceptance = _load_script()


def _run(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict[str, Any], Path, dict]:
    """The tiny run, made once even when pytest-xdist spreads these tests over workers (their
    temporary folders share a parent): (its exit code and output, its folder, its JSON)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "gpu_acceptance_tiny"
    with FileLock(str(shared / "gpu_acceptance_tiny.lock")):
        if not (out / "done.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            proc = _run(out)
            (out / "done.json").write_text(json.dumps({"returncode": proc.returncode, "stdout": proc.stdout,
                                                       "stderr": proc.stderr}))
    proc = json.loads((out / "done.json").read_text())
    assert (out / "acceptance.json").is_file(), proc["stdout"][-3000:] + proc["stderr"][-3000:]
    return proc, out, json.loads((out / "acceptance.json").read_text())


def test_every_part_passes_or_is_skipped_with_its_reason(tiny) -> None:
    proc, _, result = tiny
    assert proc["returncode"] == 0, proc["stdout"][-3000:]
    assert list(result["parts"]) == list(acceptance.PARTS)
    assert result["failures"] == []
    for name, part in result["parts"].items():
        if name == "cuda_tests":  # the only part that needs CUDA itself
            assert part["status"] == "skip" and part["reason"] == "needs a CUDA device"
            continue
        assert part["status"] == "pass", (name, part.get("reason"))
        assert part["checks"] and all(check["ok"] for check in part["checks"]), name
        assert 0 < part["seconds"] <= part["timeout_s"]


def test_the_json_holds_every_figure(tiny) -> None:
    _, out, result = tiny
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["tiny"] is True and 0 < meta["wall_s"] <= meta["budget_s"]
    assert meta["versions"]["torch"] and meta["versions"]["python"]
    assert {row["distribution"] for row in result["dependencies"]} >= {"torch", "pydantic", "pytest", "triton"}
    parts = {name: part["figures"] for name, part in result["parts"].items()}
    # the kernels and every block mechanism, within the fp32 tolerance of the interpreter
    kernels = parts["triton_kernels"]
    blocks = {key for key in kernels["rel_err"] if key.startswith("block_")}
    assert blocks == {"block_tmsa", "block_window_tmsa_w2", "block_relative_bias", "block_relative_bias_w2",
                      "block_separate_token", "block_separate_token_w2"}
    assert {"gathered_global.d_table", "gathered_windows_offset_extra.d_offset", "dense_bias.d_bias"} <= set(kernels["rel_err"])
    assert kernels["shape"][-1] == 72 and kernels["max_rel_err"] <= kernels["tolerance"] == 1e-4
    assert parts["compile_block"]["backends"]["sdpa"]["graphs"] == 1
    # the training: the loss fell, checkpoints at 20 and 40, then resumed to 44
    train = parts["train"]
    assert train["loss_last"] < 0.85 * train["loss_first"]
    assert train["checkpoints"] == ["step_0000020", "step_0000040"]
    assert (Path(train["run_dir"]) / "checkpoints" / "step_0000044").is_dir()
    assert (Path(train["run_dir"]) / "samples.png").is_file()
    for strategy in ("ddp", "fsdp"):
        assert parts[strategy]["backend"] == "gloo" and parts[strategy]["world_size"] == 1
    bench = parts["bench"]
    report = bench["report"]
    best = max((r for r in report["train"] if r["backbone"] != "dit"), key=lambda r: r["img_per_s"])
    dit = [r for r in report["train"] if r["backbone"] == "dit"][0]
    assert bench["best_backend"] == best["backend"]
    assert bench["train_img_per_s_ratio"] == pytest.approx(best["img_per_s"] / dit["img_per_s"])
    assert bench["peak_memory_ratio"] == pytest.approx(best["peak_memory_bytes"] / dit["peak_memory_bytes"])
    assert [row["sampler"] for row in report["sampling_dpm"]] == ["dpm_solver++", "dpm_solver++"]
    assert "flex" in bench["excluded_backends"]  # no CPU backward: left out with its reason
    # the further backends' rows (math on the CPU) beside the first backend's and DiT's
    assert bench["backends_done"] == ["sdpa", "math"]
    assert [(row["backend"], row["backbone"]) for row in report["train"]] == [
        ("sdpa", "latent_diffit"), ("auto", "dit"), ("math", "latent_diffit")]
    # every target: its value, n/a in the tiny run with the reason
    targets = {row["target"]: row for row in result["targets"]}
    assert list(targets) == [t[0] for t in acceptance.TARGETS]
    assert all(row["status"] == "n/a" and row["reason"] for row in targets.values())
    assert targets["mfu"]["value"] is None  # no peak on a CPU
    for name in ("train_vs_dit", "memory_vs_dit", "attention_bias_vs_sdpa", "ddpm250_guided", "dpm25"):
        assert math.isfinite(targets[name]["value"]) and targets[name]["value"] > 0, name
    assert targets["dpm25"]["value"] == report["sampling_dpm"][0]["img_per_s"]


def _table_rows(markdown: str, header: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = lines.index(header)
    assert set(lines[start + 1].replace("|", "")) == {"-"}
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert all(len(row) == header.count("|") - 1 for row in rows), rows
    return rows


def test_the_markdown_tables(tiny) -> None:
    _, out, result = tiny
    text = (out / "acceptance.md").read_text()
    parts = _table_rows(text, "| part | status | seconds | reason |")
    assert [(row[0], row[1]) for row in parts] == [(n, p["status"]) for n, p in result["parts"].items()]
    targets = _table_rows(text, "| target | measured | needed | status |")
    assert [row[3] for row in targets] == ["n/a"] * len(acceptance.TARGETS)
    assert targets[1][1] == "n/a" and targets[5][2] == ">= 30 img/s"
    train = _table_rows(text, "| model | backend | compile | img/s | step ms | MFU | peak mem GiB |")
    assert len(train) == len(result["parts"]["bench"]["figures"]["report"]["train"])


def test_a_failing_and_a_hanging_part_are_recorded_while_the_others_run(tmp_path) -> None:
    proc = _run(tmp_path, "--parts", "environment,compile_block,train", "--timeout", "train=2",
                env={acceptance.RAISE_ENV: "compile_block"})
    assert proc.returncode == 1, proc.stdout[-3000:]
    result = json.loads((tmp_path / "acceptance.json").read_text())
    parts = result["parts"]
    assert list(parts) == ["environment", "compile_block", "train"]
    assert parts["environment"]["status"] == "pass"  # still ran
    assert parts["compile_block"]["status"] == "error"
    assert parts["compile_block"]["reason"] == f"RuntimeError: failure injected through {acceptance.RAISE_ENV}"
    assert parts["train"]["status"] == "timeout" and parts["train"]["reason"].startswith("timed out after 2 s")
    assert {f["part"]: f["status"] for f in result["failures"]} == {"compile_block": "error", "train": "timeout"}
    # bench was not asked for: every target says it was not measured, and why
    assert all(row["reason"].startswith("not measured: bench did not run") for row in result["targets"])
    assert "FAILED compile_block: RuntimeError" in proc.stdout and "FAILED train: timed out" in proc.stdout


def test_targets_pass_and_fail_at_their_thresholds() -> None:
    figures = {"train_img_per_s_ratio": 1.02, "diffit_mfu": 0.44, "peak_memory_ratio": 1.0,
               "attention_best_bias_ratio": 1.2, "ddpm_img_per_s": 3.3, "dpm_img_per_s": float("nan")}
    rows = {r["target"]: r for r in acceptance.evaluate_targets({"status": "pass", "figures": figures}, False, "NVIDIA H100")}
    assert {name: row["status"] for name, row in rows.items()} == {
        "train_vs_dit": "pass", "mfu": "fail", "memory_vs_dit": "pass", "attention_bias_vs_sdpa": "fail",
        "ddpm250_guided": "pass", "dpm25": "fail"}
    assert rows["mfu"]["reason"] == "0.44 is not >= 0.45" and rows["dpm25"]["reason"] == "not finite: nan"
    assert "note" not in rows["mfu"]
    other = acceptance.evaluate_targets({"status": "pass", "figures": figures}, False, "NVIDIA H200")
    assert all("H200" in row["note"] for row in other if "met" in row)  # measured elsewhere than an H100: said


def test_missing_dependencies_say_how_to_bring_them(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(acceptance.importlib.util, "find_spec", lambda name, *a: None if name == "pydantic" else real(name, *a))
    rows = {row["distribution"]: row for row in acceptance.check_dependencies()}
    assert not rows["pydantic"]["installed"] and "train" in rows["pydantic"]["needed_by"]
    assert "pip download --no-deps" in rows["pydantic"]["hint"] and "pydantic-core" in rows["pydantic"]["hint"]
    assert rows["torch"]["installed"] and rows["torch"]["hint"] is None


def test_a_timed_out_part_keeps_its_partial_figures(tmp_path) -> None:
    """A part killed at its timeout (here a real process group that sleeps) keeps the figures it
    had written, and its reason names the timeout and its last output."""
    (tmp_path / "parts").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "parts" / "bench.json").write_text(json.dumps({"part": "bench", "status": "partial",
                                                               "figures": {"ddpm_img_per_s": 4.0}, "checks": []}))
    log = (tmp_path / "logs" / "bench.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", "print('bench: sampling dpm_solver++', flush=True); "
                             "import time; time.sleep(60)"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    time.sleep(1.0)
    job = {"name": "bench", "proc": proc, "log": log, "start": time.monotonic() - 1, "timeout": 1.0}
    record = acceptance._finish(job, tmp_path, timed_out=True)
    assert proc.poll() is not None  # killed
    assert record["status"] == "timeout" and record["figures"] == {"ddpm_img_per_s": 4.0}
    assert record["reason"] == "timed out after 1 s (last output: bench: sampling dpm_solver++)"
    targets = {r["target"]: r for r in acceptance.evaluate_targets(record, False, "NVIDIA H100")}
    assert targets["ddpm250_guided"]["status"] == "pass"
    assert targets["dpm25"]["status"] == "fail" and targets["dpm25"]["reason"].startswith("not measured: bench timeout")


def test_the_source_tree_runs_without_an_install(tmp_path) -> None:
    """On a machine where the project is not installed, the parts get the source tree and a
    ``sitecustomize`` mapping ``diffit_plugins`` and ``diffit_toolkit.recipes`` (checked here in a
    Python started without site processing, so that the installed finder is not there)."""
    import site

    (tmp_path / "sitecustomize.py").write_text(acceptance.SOURCE_TREE_FINDER % (str(ROOT), str(ROOT)))
    paths = [*site.getsitepackages(), str(ROOT), str(tmp_path)]
    code = (f"import sys; sys.path[:0] = {paths!r}; import sitecustomize, importlib.util, importlib.resources; "
            "print(importlib.util.find_spec('diffit_plugins').origin); "
            "print(importlib.resources.files('diffit_toolkit.recipes') / 'diffit_latent.yaml')")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plugins, recipe = proc.stdout.split()
    assert Path(plugins) == ROOT / "plugins" / "__init__.py" and Path(recipe).is_file()
    assert Path(recipe).parent == ROOT / "recipes"
