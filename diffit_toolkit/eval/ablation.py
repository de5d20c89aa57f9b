"""The mechanism ablation runner: train each recipe with several seeds for one budget, sample,
score with the offline digits metric, and write a table (markdown + CSV) and a plot (PNG).

Layout of the output folder:

```text
<out>/<recipe>/seed_<s>/         one job each: the training run (checkpoints every eval_every
                                 steps) and its scores, result.json (its curve rows)
<out>/curves.csv                 one row per recipe, seed and evaluated step (the final step at
                                 its best guidance scale when the suite sweeps scales)
<out>/guidance.csv               with guidance_scales: every scale at the final step
<out>/runs.csv                   one row per recipe and seed (the final step)
<out>/table.md, <out>/table.csv  mean +/- std per mechanism over the seeds
<out>/ablation.png               metric vs training steps, one line per mechanism
<out>/classifier.pt              the digits classifier used for scoring
```

Each run folder is one job ([`run_job`][diffit_toolkit.eval.jobs.run_job]): it trains, scores and
writes ``result.json``. The reports are rebuilt from the run folders after every job (and with
``report_only`` at any time), so an interrupted ablation continues where it stopped: finished runs
are skipped, stopped ones resume from their checkpoints. Where the jobs run is a
[`Launcher`][diffit_toolkit.eval.jobs.Launcher]: one after another in this process, N processes
at once, or SLURM through submitit.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffit_toolkit.errors import RunFailure
from diffit_toolkit.eval.jobs import (GRID_IMAGES, RESULT_FILE, Launcher, LauncherError, RunSpec, current_plugins,  # noqa: F401
                                      describe, launch, mechanism_source, read_result, spec_key, write_json)

CURVE_FIELDS = ("recipe", "mechanism", "seed", "step", "accuracy", "fd", "floor", "num_images", "train_seconds", "loss",
                "guidance_scale", "train_cpu_seconds", "params")


@dataclass
class AblationSuite:
    """What an ablation runs (also readable from a suite YAML, see
    [`load_suite`][diffit_toolkit.eval.ablation.load_suite]).

    Attributes:
        recipes: recipe files (one per mechanism, same backbone and budget).
        seeds: training seeds; every recipe is trained once per seed.
        overrides: ``--set`` style overrides applied to every recipe (e.g. ``train.max_steps=500``).
        eval_every: evaluate every this many training steps (0: only the final step).
        num_images: samples per evaluation (classes cycled 0..9).
        sample_steps: sampling steps (default: each recipe's).
        guidance_scale: classifier-free guidance scale (default: each recipe's).
        guidance_scales: sweep these scales at the final checkpoint and report the best FD (each
            recipe at its own best scale); the curve along the run uses ``guidance_scale``.
        out: output folder.
    """

    recipes: list[Path]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = field(default_factory=list)
    eval_every: int = 0
    num_images: int = 200
    sample_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scales: list[float] | None = None
    out: Path = Path("runs/ablation")


class AblationStopped(RunFailure, RuntimeError):
    """A training run of the ablation was asked to stop; the finished runs' reports are written."""


def load_suite(path: str | Path) -> AblationSuite:
    """Read a suite YAML: ``recipes`` (paths relative to the file), ``seeds``, ``set``, ``eval``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read ablation suite {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw.get("recipes"):
        raise ValueError(f"ablation suite {path} needs a non-empty 'recipes' list")
    ev = raw.get("eval") or {}
    unknown = set(raw) - {"recipes", "seeds", "set", "eval", "out", "description"}
    if unknown:
        raise ValueError(f"ablation suite {path}: unknown key '{sorted(unknown)[0]}'")
    return AblationSuite(
        recipes=[(path.parent / r) for r in raw["recipes"]],
        seeds=[int(s) for s in raw.get("seeds", [0, 1, 2])],
        overrides=[str(o) for o in raw.get("set", [])],
        eval_every=int(ev.get("every", 0)),
        num_images=int(ev.get("num_images", 200)),
        sample_steps=ev.get("steps"),
        guidance_scale=ev.get("guidance_scale"),
        guidance_scales=[float(g) for g in ev["guidance_scales"]] if ev.get("guidance_scales") else None,
        out=Path(raw.get("out", "runs/ablation")),
    )


def is_suite_file(path: str | Path) -> bool:
    """True when ``path`` is a YAML with a top-level ``recipes`` list (a suite, not a recipe)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "recipes" in raw


def _read_curves(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in ("seed", "step", "num_images"):
            row[key] = int(row[key])
        for key in ("accuracy", "fd", "floor", "train_seconds", "loss", "guidance_scale", "train_cpu_seconds", "params"):
            value = row.get(key)
            row[key] = float(value) if value not in (None, "", "nan") else float("nan")
    return rows


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def judge_file(kind: str) -> str:
    """File name of the cached offline judge of data ``kind`` (the dataset kind's ``judge_file``;
    empty for a kind without one)."""
    from diffit_toolkit.registry import PluginError, datasets

    try:
        return datasets.get(kind).judge_file or ""
    except PluginError:
        return ""


def judge_for(data: dict[str, Any], cache_dir: Path):
    """The offline judge of a recipe's ``data`` section, as its dataset kind declares it:
    ``(name, judge, held-out accuracy)``."""
    from diffit_toolkit.registry import datasets

    kind = str(data.get("kind", "digits"))
    cls = datasets.get(kind)
    if not cls.judge_file:
        judged = ", ".join(e.name for e in datasets.entries() if e.obj.judge_file) or "none"
        raise ValueError(f"the ablation scores with an offline judge: data.kind must be a kind that has one ({judged}), "
                         f"got '{kind}'")
    judge, held_out = cls.judge(cache_dir / cls.judge_file)
    return kind, judge, held_out


def _ablation_specs(suite: AblationSuite, device: str) -> tuple[list[RunSpec], list[str], Any]:
    """One job per (seed, recipe), seed-major (an interrupted ablation has every mechanism at the
    seeds it finished); all recipes validated before any job runs."""
    from diffit_toolkit.build import load_recipe

    out = Path(suite.out).resolve()
    recipes = [load_recipe(p, suite.overrides) for p in suite.recipes]
    names = [Path(p).stem for p in suite.recipes]
    if len(set(names)) != len(names):
        raise ValueError("two recipes of the ablation share a file name; rename one")
    kinds = {r.data.get("kind", "digits") for r in recipes}
    if len(kinds) != 1:
        raise ValueError(f"the recipes of one ablation must share their data; found kinds {sorted(kinds)}")
    plugins = current_plugins()
    specs = []
    for seed in suite.seeds:
        for path, name, recipe in zip(suite.recipes, names, recipes):
            mechanism = str(recipe.model.get("mechanism", name))
            spec = RunSpec(name=name, recipe=str(Path(path).resolve()), overrides=list(suite.overrides), seed=int(seed),
                           run_dir=str(out / name / f"seed_{seed}"), judge_dir=str(out), eval_every=suite.eval_every,
                           num_images=suite.num_images, sample_steps=suite.sample_steps,
                           guidance_scale=suite.guidance_scale, guidance_scales=suite.guidance_scales,
                           plugins=plugins, device=device)
            spec.key = spec_key(spec, recipe, code={"mechanism": mechanism_source(mechanism)})
            specs.append(spec)
    return specs, names, recipes[0]


def _adopt_curves(out: Path, specs: Sequence[RunSpec]) -> None:
    """Runs finished by an ablation of an earlier version are listed in ``curves.csv`` only: give
    each its ``result.json`` so that it is skipped, not trained again."""
    rows = _read_curves(out / "curves.csv")
    sweep = _read_curves(out / "guidance.csv")
    for spec in specs:
        mine = [r for r in rows if (r["recipe"], r["seed"]) == (spec.name, spec.seed)]
        if not mine or read_result(spec.run_dir) is not None or not Path(spec.run_dir).is_dir():
            continue
        swept = [r for r in sweep if (r["recipe"], r["seed"]) == (spec.name, spec.seed)]
        write_json(Path(spec.run_dir) / RESULT_FILE,
                   {"status": "done", "name": spec.name, "mechanism": mine[0]["mechanism"], "seed": spec.seed,
                    "key": spec.key, "params": mine[0].get("params"), "step": max(r["step"] for r in mine),
                    "rows": sorted(mine, key=lambda r: r["step"]), "sweep_rows": swept, "spec": spec.as_dict(),
                    "extra": {"adopted_from": "curves.csv"}})


def collect_results(specs: Sequence[RunSpec]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The curve rows and guidance-sweep rows of the finished runs among ``specs``."""
    rows, sweep_rows = [], []
    for spec in specs:
        result = read_result(spec.run_dir)
        if result is None:
            continue
        rows.extend(result["rows"])
        sweep_rows.extend(result.get("sweep_rows") or [])
    return rows, sweep_rows


def run_ablation(suite: AblationSuite, device: str = "cpu", log: Callable[[str], None] = print,
                 launcher: Launcher | None = None, report_only: bool = False) -> dict[str, Path]:
    """Run ``suite`` (one job per recipe and seed, each in its run folder ``<out>/<recipe>/seed_<s>``)
    and write its table, CSVs and plot from the run folders; returns the written files by kind.

    Args:
        suite: what to run.
        device: where each job trains and samples.
        log: called with one line per job.
        launcher: where the jobs run (default: one after another in this process).
        report_only: train nothing; rebuild the reports from the finished runs.

    Raises:
        AblationStopped: a job was stopped by a signal (the reports of the finished runs are written).
        LauncherError: a job failed in its own process (its log is named).
    """
    launcher = launcher or Launcher()
    out = Path(suite.out)
    launcher.folder = launcher.folder or out / "submitit"  # submitit's logs (SLURM launcher)
    specs, names, first = _ablation_specs(suite, device)
    out.mkdir(parents=True, exist_ok=True)
    _adopt_curves(out, specs)
    statuses: list[dict[str, Any]] = []
    if not report_only:
        todo = []
        for spec in specs:
            result = read_result(spec.run_dir)
            if result is not None and result.get("key") == spec.key:
                log(f"{spec.name} seed {spec.seed}: already evaluated, skipped")
            elif result is not None:
                raise ValueError(f"{spec.run_dir} holds a result made with other settings (recipe, overrides, evaluation "
                                 f"or code); give another --out or delete that folder")
            else:
                todo.append(spec)
        if todo:
            launcher.check()
            judge_name, _, held_out = judge_for(first.data, out.resolve())  # the classifier is cached before the jobs start
            log(f"{judge_name} classifier: held-out accuracy {100 * held_out:.1f}%")

        def partial(_status: dict[str, Any]) -> None:  # partial reports after every run
            rows, sweep_rows = collect_results(specs)
            if rows:
                write_reports(rows, out, order=names, sweep_rows=sweep_rows)

        statuses = launch(todo, launcher, log, done=partial)
    rows, sweep_rows = collect_results(specs)
    files: dict[str, Path] = {}
    if rows:
        files = write_reports(rows, out, order=names, sweep_rows=sweep_rows)
        if suite.guidance_scales and sweep_rows:
            _write_csv(out / "guidance.csv", sweep_rows, CURVE_FIELDS)
            files["guidance"] = out / "guidance.csv"
            files["guidance_plot"] = plot_guidance_rows(sweep_rows, out / "guidance.png", order=names)
            files["guidance_table"] = out / "guidance_table.md"
            files["guidance_table"].write_text(scale_table(sweep_rows, order=names))
    raise_for_statuses(statuses)
    if not rows:
        raise ValueError(f"no finished runs in {out} yet: run the ablation without --report-only")
    return files


def raise_for_statuses(statuses: Sequence[dict[str, Any]]) -> None:
    """Raise when a job failed ([`LauncherError`][diffit_toolkit.eval.jobs.LauncherError]) or was
    stopped ([`AblationStopped`][diffit_toolkit.eval.ablation.AblationStopped]), with one line."""
    stopped = [s for s in statuses if s.get("status") == "stopped"]
    failed = [s for s in statuses if s.get("status") == "failed"]
    pending = [s for s in statuses if s.get("status") == "pending"]
    if failed:
        raise LauncherError(f"{len(failed)} of {len(statuses)} jobs failed; first: {describe(failed[0])} "
                            f"(finished runs are in the reports; run the same command again to retry)")
    if stopped or pending:
        if not stopped:
            raise AblationStopped(f"the sweep was asked to stop before {len(pending)} run(s) started; run the same "
                                  f"command to go on: finished runs are skipped")
        first = stopped[0]
        more = f" (and {len(stopped) + len(pending) - 1} more run(s) not finished)" if len(stopped) + len(pending) > 1 else ""
        raise AblationStopped(
            f"{first['name']} seed {first['seed']} stopped by {first.get('stopped_by')} at step {first.get('step')} of "
            f"{first.get('max_steps')}{more} (checkpoint kept); run the same command to resume: finished runs are "
            f"skipped and stopped ones go on from their checkpoints")


def plot_guidance_rows(rows: Sequence[dict[str, Any]], path: Path, order: Sequence[str] | None = None,
                       title: str | None = None) -> Path:
    """The guidance trade-off (FD vs class accuracy) of ``guidance.csv`` rows: one curve per recipe,
    each point the mean over seeds at one scale."""
    from diffit_toolkit.eval.sweep import plot_guidance_sweep

    names = list(order) if order else sorted({r["recipe"] for r in rows})
    curves = {}
    for name in names:
        group = [r for r in rows if r["recipe"] == name]
        scales = sorted({r["guidance_scale"] for r in group})
        curves[name] = [dict(guidance_scale=s,
                             accuracy=float(np.mean([r["accuracy"] for r in group if r["guidance_scale"] == s])),
                             fd=float(np.mean([r["fd"] for r in group if r["guidance_scale"] == s]))) for s in scales]
    floor = float(np.mean([r["floor"] for r in rows])) if rows else None
    return plot_guidance_sweep({k: v for k, v in curves.items() if v}, path, floor=floor, title=title)


def final_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last evaluated step of every (recipe, seed)."""
    last: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        key = (row["recipe"], row["seed"])
        if key not in last or row["step"] > last[key]["step"]:
            last[key] = row
    return list(last.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t-test of mean(a) - mean(b): ``(difference, 95 % interval half-width, two-sided p)``
    (see [`welch`][diffit_toolkit.eval.stats.welch]); ``nan`` when either group has fewer than 2 values."""
    from diffit_toolkit.eval.stats import welch

    result = welch(a, b)
    return result.diff, (result.high - result.low) / 2, result.p


def summarize(rows: Sequence[dict[str, Any]], order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per recipe of the final-step accuracy, FD and loss, and Welch's
    test of each recipe's FD against the recipe with the best mean FD."""
    finals = final_rows(rows)
    names = list(order) if order else sorted({r["recipe"] for r in finals})
    table = []
    for name in names:
        group = [r for r in finals if r["recipe"] == name]
        if not group:
            continue
        acc, acc_sd = _mean_std([r["accuracy"] for r in group])
        fd, fd_sd = _mean_std([r["fd"] for r in group])
        loss, loss_sd = _mean_std([r["loss"] for r in group])
        table.append(dict(recipe=name, mechanism=group[0]["mechanism"], seeds=len(group), step=group[0]["step"],
                          accuracy_mean=acc, accuracy_std=acc_sd, fd_mean=fd, fd_std=fd_sd,
                          loss_mean=loss, loss_std=loss_sd, floor=float(np.mean([r["floor"] for r in group])),
                          train_seconds_mean=float(np.mean([r["train_seconds"] for r in group])),
                          train_cpu_seconds_mean=float(np.mean([r.get("train_cpu_seconds", math.nan) for r in group])),
                          params=float(group[0].get("params", math.nan)),
                          guidance_scales="/".join(f"{r.get('guidance_scale', math.nan):g}" for r in group)))
    if table:
        best = min(table, key=lambda r: r["fd_mean"])
        best_fds = [r["fd"] for r in finals if r["recipe"] == best["recipe"]]
        for row in table:
            fds = [r["fd"] for r in finals if r["recipe"] == row["recipe"]]
            row["fd_diff_vs_best"], row["fd_diff_ci95"], row["fd_p_vs_best"] = (
                (0.0, 0.0, 1.0) if row is best else welch_test(fds, best_fds))
    return table


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _percent(mean: float, std: float) -> str:
    """``"94.7 ± 0.8"`` (as percent), ``"n/a"`` for an unconditional testbed (no class accuracy)."""
    return "n/a" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table (best FD in bold; Welch's test against the best)."""
    best = min((r["fd_mean"] for r in table), default=math.nan)
    lines = ["| mechanism | params | seeds | steps | guidance | class accuracy (%) | FD (lower is better) "
             "| FD - best (95 % CI), p | real-vs-real floor | final loss | train s/run (wall / CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        fd = f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f}"
        if r["fd_mean"] == best:
            fd = f"**{fd}**"
            versus = "(best)"
        else:
            versus = f"+{_fmt(r.get('fd_diff_vs_best', math.nan), '.2f')} ± {_fmt(r.get('fd_diff_ci95', math.nan), '.2f')}, p={_fmt(r.get('fd_p_vs_best', math.nan), '.2g')}"
        params = r.get("params", math.nan)
        params_text = "n/a" if math.isnan(params) else f"{params / 1e6:.3f} M"
        label = r["mechanism"] if r["recipe"] == r["mechanism"] else f"{r['recipe']} ({r['mechanism']})"
        lines.append(f"| {label} | {params_text} | {r['seeds']} | {r['step']} | {r.get('guidance_scales', 'n/a')} "
                     f"| {_percent(r['accuracy_mean'], r['accuracy_std'])} "
                     f"| {fd} | {versus} | {r['floor']:.2f} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} "
                     f"| {r['train_seconds_mean']:.0f} / {_fmt(r.get('train_cpu_seconds_mean', math.nan), '.0f')} |")
    return "\n".join(lines) + "\n"


def scale_table(sweep_rows: Sequence[dict[str, Any]], order: Sequence[str] | None = None) -> str:
    """Every recipe at every swept guidance scale (final checkpoint), mean ± std over seeds of the
    class accuracy and the FD, as a markdown table with one column per scale; the best FD of each
    scale in bold. The main table scores each seed at its own best scale; this one compares the
    mechanisms at the same scale."""
    scales = sorted({float(r["guidance_scale"]) for r in sweep_rows})
    by_scale = {g: {row["recipe"]: row for row in summarize([r for r in sweep_rows if float(r["guidance_scale"]) == g], order)}
                for g in scales}
    best = {g: min(r["fd_mean"] for r in table.values()) for g, table in by_scale.items()}
    names = list(order) if order else sorted({r["recipe"] for r in sweep_rows})
    lines = ["| mechanism | " + " | ".join(f"guidance {g:g}: accuracy (%) / FD" for g in scales) + " |",
             "|---|" + "---|" * len(scales)]
    for name in names:
        cells = []
        for g in scales:
            row = by_scale[g].get(name)
            if row is None:
                cells.append("n/a")
                continue
            fd = f"{row['fd_mean']:.2f} ± {row['fd_std']:.2f}"
            if row["fd_mean"] == best[g]:
                fd = f"**{fd}**"
            cells.append(f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} / {fd}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, order: Sequence[str] | None = None,
                title: str | None = None) -> Path:
    """PNG of FD and accuracy vs training steps: one line per mechanism (mean over seeds, band: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(order) if order else sorted({r["recipe"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = None
    for name in names:
        group = [r for r in rows if r["recipe"] == name]
        if not group:
            continue
        steps = sorted({r["step"] for r in group})
        for ax, key, scale in ((axes[0], "fd", 1.0), (axes[1], "accuracy", 100.0)):
            means, stds = [], []
            for s in steps:
                m, sd = _mean_std([scale * r[key] for r in group if r["step"] == s])
                means.append(m)
                stds.append(sd)
            means, stds = np.array(means), np.array(stds)
            label = name if name == group[0]["mechanism"] else f"{name} ({group[0]['mechanism']})"
            ax.plot(steps, means, marker="o", label=label)
            ax.fill_between(steps, means - stds, means + stds, alpha=0.15)
        floor = float(np.mean([r["floor"] for r in group]))
    if floor is not None:
        axes[0].axhline(floor, color="gray", linestyle="--", label="real-vs-real floor")
    axes[1].axhline(10.0, color="gray", linestyle=":", label="chance (10 classes)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("FD (log scale, lower is better)")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("class accuracy of samples (%)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle(title or "Mechanism ablation (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def at_one_scale(rows: Sequence[dict[str, Any]], sweep_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curve rows with each run's final step at the scale of its earlier steps (taken from the
    guidance sweep) instead of its best scale, so that a plotted curve stays at one guidance scale."""
    swept = {(r["recipe"], r["seed"], r["step"], float(r["guidance_scale"])): r for r in sweep_rows}
    out = []
    for row in rows:
        earlier = {float(r["guidance_scale"]) for r in rows
                   if (r["recipe"], r["seed"]) == (row["recipe"], row["seed"]) and r["step"] < row["step"]}
        if len(earlier) == 1:
            row = swept.get((row["recipe"], row["seed"], row["step"], earlier.pop()), row)
        out.append(row)
    return out


def write_reports(rows: Sequence[dict[str, Any]], out: Path, order: Sequence[str] | None = None,
                  sweep_rows: Sequence[dict[str, Any]] = ()) -> dict[str, Path]:
    """Write ``runs.csv``, ``table.csv``, ``table.md`` and ``ablation.png`` from the curve rows (the
    plot at the curve's guidance scale throughout when ``sweep_rows`` hold the final step at it)."""
    if not rows:
        raise ValueError("the ablation produced no evaluations")
    out = Path(out)
    table = summarize(rows, order)
    files = {"curves": out / "curves.csv", "runs": out / "runs.csv", "table_csv": out / "table.csv",
             "table_md": out / "table.md", "plot": out / "ablation.png"}
    _write_csv(files["curves"], rows, CURVE_FIELDS)
    finals = final_rows(rows)
    if order:
        finals.sort(key=lambda r: (list(order).index(r["recipe"]), r["seed"]))
    _write_csv(files["runs"], finals, CURVE_FIELDS)
    _write_csv(files["table_csv"], table, list(table[0]))
    files["table_md"].write_text(markdown_table(table))
    curve = at_one_scale(rows, sweep_rows)
    scales = sorted({float(r["guidance_scale"]) for r in curve})
    title = f"Mechanism ablation at guidance {scales[0]:g} (mean ± std over seeds)" if len(scales) == 1 else None
    plot_curves(curve, files["plot"], order, title=title)
    return files
