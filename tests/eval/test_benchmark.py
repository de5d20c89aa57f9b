"""``diffit-toolkit benchmark``: the real CLI ranks a user's one-file plugin against a reference and
reuses its cached runs; the plan adds a parameter-matched variant; the report's statistics on
injected per-seed results (Holm over all pairs, verdicts, detectable difference)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.eval import benchmark as bm
from diffit_toolkit.eval.jobs import RESULT_FILE, write_json
from diffit_toolkit.eval.stats import holm

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.hidden_size=16", "--set", "model.depth=1", "--set", "model.num_heads=2",
        "--set", "train.batch_size=8", "--set", "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from diffit_toolkit.eval.digits import DigitsMetric

    path = tmp_path_factory.mktemp("judge") / "classifier.pt"
    # the classifier is memoised per process: save it here whether or not this call trained it
    torch.save(DigitsMetric(seed=0).classifier.state_dict(), path)
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DIFFIT_TOOLKIT_PLUGINS"}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "diffit_toolkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_benchmark_cli_ranks_a_user_plugin_and_reuses_its_cache(tmp_path, classifier):
    out = tmp_path / "bench"
    (out / "runs" / "judges").mkdir(parents=True)
    shutil.copy(classifier, out / "runs" / "judges" / "classifier.pt")
    args = ["-p", str(ROOT / "docs" / "examples" / "user_plugin.py"), "benchmark", "gated_tmsa", "--against", "tmsa",
            "--testbeds", "digits", "--seeds", "2", "--steps", "4", "--num-images", "10", "--sample-steps", "2", "--guidance-scales", "1,2",
            *TINY, "--device", "cpu", "--jobs", "2", "--out", str(out)]
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads((out / "benchmark.json").read_text())
    arms = report["testbeds"]["digits"]["mechanisms"]
    assert {"gated_tmsa", "tmsa"} <= set(arms)
    for label, arm in arms.items():
        assert arm["params"] > 0 and arm["seeds"] == [0, 1] and len(arm["values"]) == 2
        assert arm["mean"] == pytest.approx(sum(arm["values"]) / 2) and arm["std"] >= 0
    assert arms["gated_tmsa"]["role"] == "candidate" and arms["tmsa"]["role"] == "reference"
    assert arms["gated_tmsa"]["params"] != arms["tmsa"]["params"]  # the plugin's gates are counted
    (pair, *_) = [p for p in report["pairs"] if p["mechanism"] == "gated_tmsa"]
    assert pair["reference"] == "tmsa" and pair["n"] == [2, 2]
    assert pair["difference"] == pytest.approx(arms["gated_tmsa"]["mean"] - arms["tmsa"]["mean"])
    assert pair["ci95"][0] <= pair["difference"] <= pair["ci95"][1] and 0 <= pair["p_holm"] <= 1
    assert pair["verdict"] in ("better", "worse", "no detectable difference") and pair["detectable_difference"] > 0
    assert report["runs"]["trained"] == report["runs"]["total"] >= 4 and report["runs"]["reused"] == 0
    assert "gated_tmsa vs tmsa" in (out / "benchmark.md").read_text() and "gated_tmsa vs tmsa" in first.stdout
    results = sorted((out / "runs").glob(f"digits/*/seed_*/{RESULT_FILE}"))
    assert len(results) == report["runs"]["total"]
    stamps = [p.stat().st_mtime_ns for p in results]
    # the same command again trains nothing; so does another output folder sharing the cache
    again = _cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((out / "benchmark.json").read_text())["runs"] == {"total": len(results), "reused": len(results), "trained": 0}
    shared = _cli(*args[:-2], "--out", str(tmp_path / "other"), "--cache", str(out / "runs"), cwd=tmp_path)
    assert shared.returncode == 0, shared.stdout + shared.stderr
    assert json.loads((tmp_path / "other" / "benchmark.json").read_text())["runs"]["trained"] == 0
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert json.loads((tmp_path / "other" / "benchmark.json").read_text())["pairs"] == report["pairs"]


def _plan(tmp_path: Path, mechanism: str = "adaln_zero", against: tuple[str, ...] = ("tmsa",)) -> bm.BenchmarkPlan:
    return bm.BenchmarkPlan(mechanism=mechanism, against=list(against), testbeds=bm.resolve_testbeds("digits"),
                            seeds=[0, 1, 2, 3, 4], out=tmp_path / "bench", steps=10, num_images=10)


def test_a_mechanism_with_more_parameters_also_runs_a_matched_variant(tmp_path, monkeypatch):
    arms, notes = bm.plan_arms(_plan(tmp_path), log=lambda line: None)
    by_label = {a.label: a for a in arms}
    candidate, reference = by_label["adaln_zero"], by_label["tmsa"]
    assert candidate.params > 1.1 * reference.params and not notes
    (matched,) = [a for a in arms if a.role == "matched"]
    width = int(matched.label.rsplit("-h", 1)[1])
    assert f"model.hidden_size={width}" in matched.overrides and width < 64 and width % 4 == 0
    assert abs(matched.params - reference.params) <= 0.1 * reference.params and matched.matched_to == ["tmsa"]
    assert len({s.run_dir for a in arms for s in a.specs}) == 15  # 3 arms x 5 seeds, each its own folder
    # the run folders of a reference do not depend on the candidate: they are shared
    other, _ = bm.plan_arms(_plan(tmp_path, "relative_bias"), log=lambda line: None)
    assert [s.run_dir for s in reference.specs] == [s.run_dir for a in other if a.label == "tmsa" for s in a.specs]
    monkeypatch.setattr(bm, "MATCH_TOLERANCE", 1e-9)
    arms, notes = bm.plan_arms(_plan(tmp_path), log=lambda line: None)
    assert not [a for a in arms if a.role == "matched"] and "is not matched to tmsa" in notes[0]


def _inject(arm: bm.Arm, values: list[float]) -> None:
    for spec, value in zip(arm.specs, values):
        Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(spec.run_dir) / RESULT_FILE, {"key": spec.key, "rows": [{"step": 10, "fd": value, "accuracy": 0.5}]})


def test_the_report_ranks_injected_results_with_holm_over_all_pairs(tmp_path):
    plan = _plan(tmp_path, against=("tmsa", "relative_bias"))
    arms, _ = bm.plan_arms(plan, log=lambda line: None)
    by_label = {a.label: a for a in arms}
    _inject(by_label["adaln_zero"], [5.0, 5.2, 4.9, 5.1, 5.0])  # clearly better (lower FD) than both
    _inject(by_label["tmsa"], [9.0, 9.3, 8.8, 9.1, 9.2])
    _inject(by_label["relative_bias"], [5.3, 4.7, 5.6, 4.8, 5.1])  # indistinguishable from the candidate
    matched = [a for a in arms if a.role == "matched"]
    for arm in matched:
        _inject(arm, [9.1, 9.0, 9.4, 8.9, 9.2])  # matched to tmsa: no difference
    report = bm.run_benchmark(plan, log=lambda line: None, report_only=True)
    assert report["runs"] == {"total": 5 * len(arms), "reused": 5 * len(arms), "trained": 0}
    pairs = {(p["mechanism"], p["reference"]): p for p in report["pairs"]}
    assert pairs[("adaln_zero", "tmsa")]["verdict"] == "better"
    assert pairs[("adaln_zero", "tmsa")]["difference"] == pytest.approx(5.04 - 9.08)
    assert pairs[("adaln_zero", "relative_bias")]["verdict"] == "no detectable difference"
    for arm in matched:
        assert pairs[(arm.label, "tmsa")]["verdict"] == "no detectable difference"
    assert [p["p_holm"] for p in report["pairs"]] == pytest.approx(holm([p["p"] for p in report["pairs"]]))
    # more pairs, stricter: every detectable difference is at alpha / (number of pairs)
    assert all(p["detectable_difference"] > abs(p["ci95"][1] - p["ci95"][0]) / 4 for p in report["pairs"])
    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert saved["testbeds"]["digits"]["mechanisms"]["tmsa"]["values"] == [9.0, 9.3, 8.8, 9.1, 9.2]
    md = (tmp_path / "bench" / "benchmark.md").read_text()
    assert "| adaln_zero vs tmsa |" in md and "better" in md and "matched to tmsa" in md


def test_every_default_testbed_is_a_shipped_recipe_that_takes_every_reference():
    from diffit_toolkit.build import load_recipe

    testbeds = bm.resolve_testbeds(None)
    assert list(testbeds) == list(bm.DEFAULT_TESTBEDS) and "digits" in testbeds
    for name, path in testbeds.items():
        assert path.is_file(), name
        for mechanism in bm.DEFAULT_AGAINST:
            recipe = load_recipe(path, [f"model.mechanism={mechanism}"])
            assert recipe.model["mechanism"] == mechanism


def test_benchmark_bad_input_is_one_line_naming_the_fix(tmp_path):
    for args, expected in ((["nope_mech"], "unknown conditioning mechanism 'nope_mech'"),
                           (["tmsa", "--against", "adaln_zro"], "did you mean 'adaln_zero'"),
                           (["tmsa", "--seeds", "1"], "at least 2 seeds"),
                           (["tmsa", "--seeds", "a,b"], "--seeds takes a count"),
                           (["tmsa", "--testbeds", "digitz"], "did you mean 'digits'"),
                           (["tmsa", "--testbeds", "x=missing.yaml"], "no such recipe file"),
                           (["tmsa", "--against", ""], "--against is empty"),
                           (["tmsa", "--report-only", "--launcher", "pbs"], "--launcher must be one of")):
        result = CliRunner().invoke(app, ["benchmark", *args, "--out", str(tmp_path / "b")])
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_report_only_without_runs_lists_them_as_missing(tmp_path):
    report = bm.run_benchmark(_plan(tmp_path, "tmsa", ("adaln_zero",)), log=lambda line: None, report_only=True)
    assert report["runs"]["reused"] == 0 and report["pairs"][0]["verdict"] == "no detectable difference"
    assert report["testbeds"]["digits"]["mechanisms"]["tmsa"]["n"] == 0
    assert "n/a" in (tmp_path / "bench" / "benchmark.md").read_text()


def test_a_backbone_without_a_width_is_matched_by_its_mlp_ratio(tmp_path, monkeypatch):
    plan = bm.BenchmarkPlan(mechanism="adaln_zero", against=["tmsa"], testbeds=bm.resolve_testbeds("canvas"),
                            seeds=[0, 1], out=tmp_path / "bench", steps=10, num_images=10)
    arms, notes = bm.plan_arms(plan, log=lambda line: None)
    by_label = {a.label: a for a in arms}
    candidate, reference = by_label["adaln_zero"], by_label["tmsa"]
    assert candidate.params > 1.1 * reference.params and not notes
    (matched,) = [a for a in arms if a.role == "matched"]
    ratio = float(matched.label.rsplit("-mlp", 1)[1])
    assert f"model.mlp_ratio={ratio:g}" in matched.overrides and 0 < ratio < 4
    assert abs(matched.params - reference.params) <= 0.02 * reference.params  # linear in the ratio: close
    assert not any("hidden_size" in o for o in matched.overrides)
    monkeypatch.setattr(bm, "MAX_MATCHED_MLP_RATIO", 0.01)  # no admissible ratio: a note says so
    arms, notes = bm.plan_arms(plan, log=lambda line: None)
    assert {a.role for a in arms} == {"candidate", "reference"}
    assert len(notes) == 1 and "no mlp_ratio comes within 10%" in notes[0] and "adaln_zero" in notes[0]
