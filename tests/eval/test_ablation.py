"""The ablation runner on a tiny budget writes one row per recipe and seed, a table and a plot."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.eval.ablation import load_suite, markdown_table, summarize, welch_test

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "ablation"


def test_shipped_suite_lists_the_five_mechanisms_with_three_seeds():
    suite = load_suite(RECIPES / "suite.yaml")
    assert [p.stem for p in suite.recipes] == ["tmsa", "relative_bias", "mlp", "separate_token", "adaln_zero"]
    assert len(suite.seeds) >= 3 and all(p.is_file() for p in suite.recipes)


def test_ablation_runner_tiny_budget(tmp_path):
    suite = {
        "recipes": [str(RECIPES / "tmsa.yaml"), str(RECIPES / "adaln_zero.yaml")],
        "seeds": [0, 1],
        "set": ["train.max_steps=4", "train.batch_size=8", "train.warmup_steps=0", "model.hidden_size=16",
                "model.depth=1", "model.num_heads=2"],
        "eval": {"every": 2, "num_images": 10, "steps": 2, "guidance_scales": [1.0, 2.0]},
        "out": str(tmp_path / "abl"),
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "suite.yaml")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "abl"
    for name in ("table.md", "table.csv", "runs.csv", "curves.csv", "ablation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert sorted((r["recipe"], r["seed"]) for r in runs) == [("adaln_zero", "0"), ("adaln_zero", "1"), ("tmsa", "0"), ("tmsa", "1")]
    assert {r["step"] for r in runs} == {"4"}
    curves = list(csv.DictReader((out / "curves.csv").open()))
    assert len(curves) == 8  # steps 2 and 4 of every run
    assert all(float(r["train_cpu_seconds"]) > 0 and int(float(r["params"])) > 0 for r in curves)
    sweep = list(csv.DictReader((out / "guidance.csv").open()))
    assert len(sweep) == 8 and {r["guidance_scale"] for r in sweep} == {"1", "2"}  # final step, 2 scales, 4 runs
    assert (out / "guidance.png").stat().st_size > 0
    by_scale = (out / "guidance_table.md").read_text().splitlines()
    assert "guidance 1: accuracy (%) / FD" in by_scale[0] and "guidance 2:" in by_scale[0]
    assert [line.split("|")[1].strip() for line in by_scale[2:]] == ["tmsa", "adaln_zero"]
    for line in by_scale[2:]:  # each cell: the mean over both seeds at that scale
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        for g, cell in zip(("1", "2"), cells):
            fds = [float(r["fd"]) for r in sweep if (r["recipe"], r["guidance_scale"]) == (name, g)]
            assert f"{sum(fds) / 2:.2f} ±" in cell
    for run in runs:  # the final row is the run's best scale
        scales = [r for r in sweep if (r["recipe"], r["seed"]) == (run["recipe"], run["seed"])]
        assert float(run["fd"]) == min(float(r["fd"]) for r in scales)
    table = list(csv.DictReader((out / "table.csv").open()))
    assert [r["mechanism"] for r in table] == ["tmsa", "adaln_zero"]
    md = (out / "table.md").read_text()
    assert md.count("\n") == 4 and "±" in md
    # a second call finds every (recipe, seed) done and only rewrites the reports
    again = CliRunner().invoke(app, ["ablate", str(tmp_path / "suite.yaml")])
    assert again.exit_code == 0 and again.output.count("already evaluated") == 4


def test_summary_mean_and_std():
    rows = [dict(recipe="a", mechanism="a", seed=s, step=10, accuracy=acc, fd=fd, floor=1.0, num_images=10,
                 train_seconds=1.0, loss=0.5) for s, (acc, fd) in enumerate([(0.5, 2.0), (0.7, 4.0)])]
    (row,) = summarize(rows)
    assert row["accuracy_mean"] == 0.6 and row["fd_mean"] == 3.0 and abs(row["fd_std"] - 2**0.5) < 1e-12
    assert "3.00 ± 1.41" in markdown_table([row])


def test_bad_suite_and_missing_recipe_are_one_line_errors(tmp_path):
    (tmp_path / "s.yaml").write_text("recipes: []\n")
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "s.yaml")])
    assert result.exit_code == 2 and "recipes" in result.output
    result = CliRunner().invoke(app, ["ablate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output


def test_welch_test_matches_scipy_and_the_table_reports_it():
    from scipy import stats

    a, b = [3.0, 3.5, 4.1], [2.0, 2.2, 2.1]
    diff, half, p = welch_test(a, b)
    assert diff == sum(a) / 3 - sum(b) / 3
    assert p == stats.ttest_ind(a, b, equal_var=False).pvalue
    assert 0 < half and abs(diff) > half  # significant: the 95 % interval excludes 0
    rows = [dict(recipe=name, mechanism=name, seed=s, step=10, accuracy=0.9, fd=fd, floor=1.0, num_images=10,
                 train_seconds=1.0, loss=0.5, guidance_scale=1.5, train_cpu_seconds=2.0, params=1e5)
            for name, fds in (("a", a), ("b", b)) for s, fd in enumerate(fds)]
    table = summarize(rows)
    assert table[1]["fd_diff_vs_best"] == 0 and table[0]["fd_p_vs_best"] == p
    assert "p=" in markdown_table(table) and "0.100 M" in markdown_table(table)


def test_plotted_curve_keeps_one_guidance_scale_at_the_final_step():
    from diffit_toolkit.eval.ablation import at_one_scale

    def row(step, g, fd):
        return dict(recipe="a", mechanism="a", seed=0, step=step, guidance_scale=g, fd=fd)

    rows = [row(1, 1.5, 9.0), row(2, 1.5, 7.0), row(3, 1.0, 3.0)]  # the final row: the best scale, 1.0
    sweep = [row(3, 1.0, 3.0), row(3, 1.5, 6.5), row(3, 2.0, 12.0)]
    assert [(r["guidance_scale"], r["fd"]) for r in at_one_scale(rows, sweep)] == [(1.5, 9.0), (1.5, 7.0), (1.5, 6.5)]
    assert at_one_scale(rows, []) == rows  # without a sweep the rows stay as they are


def test_runs_finished_by_an_earlier_version_are_adopted_from_curves_csv(tmp_path):
    # an ablation folder written before runs were jobs: curves.csv lists the finished runs, the run
    # folders have no result.json; they are skipped (not trained again) and stay in the reports
    from diffit_toolkit.eval.ablation import CURVE_FIELDS, AblationSuite, _write_csv, run_ablation
    from diffit_toolkit.eval.jobs import read_result

    out = tmp_path / "abl"
    rows = [dict(recipe="tmsa", mechanism="tmsa", seed=0, step=s, accuracy=0.5, fd=fd, floor=1.0, num_images=10,
                 train_seconds=1.0, loss=0.5, guidance_scale=1.5, train_cpu_seconds=2.0, params=1e5)
            for s, fd in ((2, 9.0), (4, 7.0))]
    (out / "tmsa" / "seed_0" / "checkpoints").mkdir(parents=True)
    _write_csv(out / "curves.csv", rows, CURVE_FIELDS)
    suite = AblationSuite(recipes=[RECIPES / "tmsa.yaml"], seeds=[0], out=out)
    lines: list[str] = []
    files = run_ablation(suite, log=lines.append)
    assert lines == ["tmsa seed 0: already evaluated, skipped"]
    result = read_result(out / "tmsa" / "seed_0")
    assert [r["step"] for r in result["rows"]] == [2, 4] and result["rows"][-1]["fd"] == 7.0
    assert "7.00 ± 0.00" in files["table_md"].read_text()
