"""Rank a conditioning mechanism against references: ``diffit-toolkit benchmark``.

For each *testbed* (a base recipe; the mechanism is set with ``model.mechanism=<name>``) every
mechanism is trained with several seeds for the same budget and scored by the testbed's offline
judge (FD, lower is better) at its best guidance scale (conditional testbeds) or once
(unconditional ones). A mechanism whose parameter count differs from a reference's by more than
10 % also runs a parameter-matched variant (its ``hidden_size``, or on a backbone without one its
``mlp_ratio``, adjusted) where one exists. Each
candidate-vs-reference pair gets Welch's difference with a 95 % interval, a Holm-Bonferroni
corrected p-value (over all pairs of all testbeds), a verdict and the smallest difference the
design could detect ([`diffit_toolkit.eval.stats`][diffit_toolkit.eval.stats]).

Every (testbed, mechanism, seed) is one job ([`run_job`][diffit_toolkit.eval.jobs.run_job]) in
the run cache, in a folder named by the hash of everything that determines its result (the
resolved recipe with its overrides, the evaluation settings, the toolkit version and the
mechanism's source file): the references are trained once and reused by every later benchmark
that shares the cache.

```text
<cache>/<testbed>/<label>-<key>/seed_<s>/   one job: the run, its scores (result.json)
<out>/benchmark.json, <out>/benchmark.md    the ranking
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffit_toolkit.eval.jobs import Launcher, RunSpec, current_plugins, launch, mechanism_source, read_result, spec_key
from diffit_toolkit.eval.stats import ALPHA, POWER, detectable_difference, holm, pooled_std, verdict, welch

#: The built-in CPU testbeds: name -> base recipe, relative to the shipped recipes (or a path).
#: ``digits``: 8x8 class-conditional digits (16 tokens); ``canvas``: unconditional digits at random
#: offsets on a 16x16 canvas (64 tokens: positions and windows matter).
DEFAULT_TESTBEDS: dict[str, str] = {"digits": "ablation/base.yaml", "canvas": "benchmark/base.yaml"}
#: The references a mechanism is compared with by default.
DEFAULT_AGAINST = ("tmsa", "adaln_zero")
#: Guidance scales tried at the final checkpoint of a conditional testbed (the best FD is kept).
DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0)
#: The ranked metric and its direction.
METRIC, LOWER_IS_BETTER = "fd", True
#: Parameter counts within this fraction of a reference's count are "matched".
MATCH_TOLERANCE = 0.10
#: Largest MLP ratio a parameter-matched variant may get (four is the usual ratio).
MAX_MATCHED_MLP_RATIO = 16.0


@dataclass
class BenchmarkPlan:
    """What ``diffit-toolkit benchmark`` runs.

    Attributes:
        mechanism: the candidate (a registered conditioning mechanism, e.g. from a ``-p`` plugin).
        against: the reference mechanisms.
        testbeds: name -> base recipe file.
        seeds: training seeds of every arm.
        out: where benchmark.json and benchmark.md go.
        cache: the run cache (default ``<out>/runs``), shareable between output folders.
        steps: training budget override (``train.max_steps``; default: each testbed's).
        num_images: samples per score.
        sample_steps: sampling steps (default: each testbed's).
        guidance_scales: scales tried on conditional testbeds (the best FD is kept).
        overrides: further ``--set`` overrides applied to every arm.
        device: where the jobs train and sample.
    """

    mechanism: str
    against: list[str]
    testbeds: dict[str, Path]
    seeds: list[int]
    out: Path
    cache: Path | None = None
    steps: int | None = None
    num_images: int = 200
    sample_steps: int | None = None
    guidance_scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    overrides: list[str] = field(default_factory=list)
    device: str = "cpu"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache is not None else Path(self.out) / "runs"


@dataclass
class Arm:
    """One mechanism (or a parameter-matched variant of one) on one testbed."""

    testbed: str
    label: str
    mechanism: str
    role: str  # "candidate", "reference" or "matched"
    overrides: list[str]
    params: int
    matched_to: list[str] = field(default_factory=list)
    specs: list[RunSpec] = field(default_factory=list)


def resolve_testbeds(text: str | None) -> dict[str, Path]:
    """``--testbeds``: comma-separated built-in names (``digits``), recipe files, or ``name=file``
    (default: every built-in testbed)."""
    from diffit_toolkit.errors import did_you_mean
    from diffit_toolkit.recipe import RECIPES_DIR

    def builtin(name: str) -> Path:
        path = Path(DEFAULT_TESTBEDS[name])
        return path if path.is_absolute() else RECIPES_DIR / path

    if not text:
        return {name: builtin(name) for name in DEFAULT_TESTBEDS}
    out: dict[str, Path] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, file = item.partition("=")
        if file:
            path = Path(file)
        elif item in DEFAULT_TESTBEDS:
            path = builtin(item)
        elif item.endswith((".yaml", ".yml")) or Path(item).exists():
            path, name = Path(item), Path(item).stem
        else:
            raise ValueError(f"unknown testbed '{item}'{did_you_mean(item, DEFAULT_TESTBEDS)} (built-in: "
                             f"{', '.join(DEFAULT_TESTBEDS)}); or give a recipe file, or name=recipe.yaml")
        if not path.is_file():
            raise ValueError(f"testbed '{name}': no such recipe file {path}")
        if name in out:
            raise ValueError(f"two testbeds are named '{name}'; name them with name=recipe.yaml")
        out[name] = path.resolve()
    if not out:
        raise ValueError("--testbeds is empty: give built-in names or recipe files, comma-separated")
    return out


def parse_seeds(text: str | None, default: int = 5) -> list[int]:
    """``--seeds``: a count (``5``: seeds 0..4) or a comma-separated list (``0,3,7``); at least two."""
    text = (text or str(default)).strip()
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes a count (e.g. 5) or comma-separated seeds (e.g. 0,1,2); got '{text}'") from None
    seeds = list(range(values[0])) if len(values) == 1 and "," not in text else values
    if len(set(seeds)) < 2:
        raise ValueError(f"--seeds {text}: the statistics need at least 2 seeds per mechanism (5 by default)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text} repeats a seed")
    return seeds


def check_mechanisms(names: Sequence[str]) -> None:
    """Every name is a registered conditioning mechanism (one line with "did you mean" otherwise)."""
    from diffit_toolkit.registry import conditioning

    for name in names:
        conditioning.entry(name)


# -- the plan --------------------------------------------------------------------------------------


def _base_overrides(plan: BenchmarkPlan) -> list[str]:
    out = list(plan.overrides)
    if plan.steps is not None:
        out.append(f"train.max_steps={int(plan.steps)}")
    return out


_FACTS: dict[str, dict[str, Any]] = {}


def count_params(recipe_path: Path, overrides: Sequence[str]) -> tuple[int, Any]:
    """Parameters of the model a recipe builds (on the meta device: no memory, no training)."""
    import json

    from diffit_toolkit.build import build_dataset, build_model, data_facts, load_recipe

    recipe = load_recipe(recipe_path, overrides)
    data_key = json.dumps(recipe.data, sort_keys=True, default=str)
    if data_key not in _FACTS:  # the data are read once per testbed
        _FACTS[data_key] = data_facts(build_dataset(recipe))
    model = build_model(recipe, _FACTS[data_key], device="meta")
    return sum(p.numel() for p in model.parameters()), recipe


def _matched_width(recipe_path: Path, overrides: Sequence[str], target: int, recipe: Any) -> tuple[str, str, int] | None:
    """The ``hidden_size`` (a multiple of ``num_heads``, up to four times the width) closest to ``target``."""
    from diffit_toolkit.recipe import RecipeError

    heads = int(recipe.model.get("num_heads", 1) or 1)
    width = int(recipe.model.get("hidden_size", 0) or 0)
    best: tuple[str, str, int] | None = None
    for h in range(heads, 4 * width + 1, heads):
        try:
            params, _ = count_params(recipe_path, [*overrides, f"model.hidden_size={h}"])
        except (RecipeError, ValueError):
            continue
        if best is None or abs(params - target) < abs(best[2] - target):
            best = (f"model.hidden_size={h}", f"h{h}", params)
        if params > target * (1 + MATCH_TOLERANCE):
            break  # wider only grows
    return best


def _matched_mlp_ratio(recipe_path: Path, overrides: Sequence[str], target: int, recipe: Any) -> tuple[str, str, int] | None:
    """The ``mlp_ratio`` (two decimals) closest to ``target``: the parameter count is linear in it,
    so two counts give the ratio and a third checks it."""
    from diffit_toolkit.recipe import RecipeError

    try:
        low, high = (count_params(recipe_path, [*overrides, f"model.mlp_ratio={r}"])[0] for r in (2.0, 4.0))
    except (RecipeError, ValueError, TypeError):
        return None  # a backbone without an MLP ratio
    if high == low:
        return None
    ratio = round(2.0 + 2.0 * (target - low) / (high - low), 2)
    if not 0 < ratio <= MAX_MATCHED_MLP_RATIO:
        return None
    params = count_params(recipe_path, [*overrides, f"model.mlp_ratio={ratio:g}"])[0]
    return f"model.mlp_ratio={ratio:g}", f"mlp{ratio:g}", params


def match_parameters(recipe_path: Path, overrides: Sequence[str], target: int) -> tuple[str, str, int] | None:
    """``(override, label suffix, params)`` of the variant that brings the model within
    ``MATCH_TOLERANCE`` (10 %) of ``target`` parameters, or ``None``. The knob: ``hidden_size``
    where the testbed's model section sets one (the transformer's width), else ``mlp_ratio`` (the
    U-shaped backbone, whose stage widths are tied to its head and group sizes): the attention, its
    heads and windows stay as they are."""
    _, recipe = count_params(recipe_path, overrides)
    knob = _matched_width if recipe.model.get("hidden_size") else _matched_mlp_ratio
    best = knob(recipe_path, overrides, target, recipe)
    if best is None or abs(best[2] - target) > MATCH_TOLERANCE * target:
        return None
    return best


def plan_arms(plan: BenchmarkPlan, log: Callable[[str], None] = print) -> tuple[list[Arm], list[str]]:
    """The arms of every testbed (candidate, references, parameter-matched variants) with their
    jobs, and the notes of pairs that could not be parameter-matched."""
    from diffit_toolkit.build import load_recipe

    base = _base_overrides(plan)
    arms: list[Arm] = []
    notes: list[str] = []
    plugins = current_plugins()
    cache = plan.cache_dir.resolve()
    for testbed, recipe_path in plan.testbeds.items():
        counts = {}
        for mech in [plan.mechanism, *plan.against]:
            counts[mech] = count_params(recipe_path, [*base, f"model.mechanism={mech}"])[0]
        tb_arms = [Arm(testbed, plan.mechanism, plan.mechanism, "candidate", [*base, f"model.mechanism={plan.mechanism}"],
                       counts[plan.mechanism])]
        tb_arms += [Arm(testbed, ref, ref, "reference", [*base, f"model.mechanism={ref}"], counts[ref])
                    for ref in plan.against if ref != plan.mechanism]
        for ref in plan.against:
            if ref == plan.mechanism or abs(counts[plan.mechanism] - counts[ref]) <= MATCH_TOLERANCE * counts[ref]:
                continue
            found = match_parameters(recipe_path, [*base, f"model.mechanism={plan.mechanism}"], counts[ref])
            if found is None:
                knob = "hidden_size" if load_recipe(recipe_path, base).model.get("hidden_size") else "mlp_ratio"
                notes.append(f"{testbed}: {plan.mechanism} ({counts[plan.mechanism]:,} parameters) is not matched to "
                             f"{ref} ({counts[ref]:,}): no {knob} comes within {MATCH_TOLERANCE:.0%}")
                continue
            override, suffix, params = found
            label = f"{plan.mechanism}-{suffix}"
            existing = next((a for a in tb_arms if a.label == label), None)
            if existing is not None:
                existing.matched_to.append(ref)
                continue
            tb_arms.append(Arm(testbed, label, plan.mechanism, "matched",
                               [*base, f"model.mechanism={plan.mechanism}", override], params, [ref]))
            log(f"{testbed}: {plan.mechanism} has {counts[plan.mechanism]:,} parameters, {ref} {counts[ref]:,}: "
                f"also running {label} ({params:,})")
        for arm in tb_arms:
            arm.specs = _arm_specs(plan, arm, recipe_path, cache, plugins)
        arms += tb_arms
    return arms, notes


def _arm_specs(plan: BenchmarkPlan, arm: Arm, recipe_path: Path, cache: Path, plugins: list[str]) -> list[RunSpec]:
    from diffit_toolkit.build import load_recipe

    recipe = load_recipe(recipe_path, arm.overrides)
    template = RunSpec(name=arm.label, recipe=str(recipe_path), overrides=arm.overrides, seed=0, run_dir="",
                       judge_dir=str(cache / "judges"), num_images=plan.num_images, sample_steps=plan.sample_steps,
                       guidance_scales=list(plan.guidance_scales), plugins=plugins, device=plan.device,
                       extra={"testbed": arm.testbed})
    key = spec_key(template, recipe, code={"mechanism": mechanism_source(arm.mechanism)})
    specs = []
    for seed in plan.seeds:
        spec = RunSpec(**{**template.as_dict(), "seed": int(seed), "key": key,
                          "run_dir": str(cache / arm.testbed / f"{arm.label}-{key}" / f"seed_{seed}")})
        specs.append(spec)
    return specs


# -- running and reporting -------------------------------------------------------------------------


def run_benchmark(plan: BenchmarkPlan, launcher: Launcher | None = None, log: Callable[[str], None] = print,
                  report_only: bool = False) -> dict[str, Any]:
    """Plan, run what the cache lacks, analyse and write ``benchmark.json`` / ``benchmark.md``.
    Returns the report (see [`analyse`][diffit_toolkit.eval.benchmark.analyse]) with the files."""
    from diffit_toolkit.build import load_recipe
    from diffit_toolkit.eval.ablation import AblationStopped, judge_for, raise_for_statuses
    from diffit_toolkit.eval.jobs import write_json

    launcher = launcher or Launcher()
    launcher.folder = launcher.folder or plan.cache_dir / "submitit"  # submitit's logs (SLURM launcher)
    check_mechanisms([plan.mechanism, *plan.against])
    arms, notes = plan_arms(plan, log)
    specs = [spec for arm in arms for spec in arm.specs]
    todo = [s for s in specs if (read_result(s.run_dir) or {}).get("key") != s.key]
    reused = len(specs) - len(todo)
    statuses: list[dict[str, Any]] = []
    if report_only:
        log(f"{reused} of {len(specs)} runs are in the cache {plan.cache_dir}; training none (--report-only)")
    else:
        log(f"{len(specs)} runs: {reused} from the cache {plan.cache_dir}, {len(todo)} to train")
        if todo:
            launcher.check()
            for testbed in sorted({s.extra["testbed"] for s in todo}):  # the judges are cached before the jobs start
                judge_for(load_recipe(plan.testbeds[testbed]).data, plan.cache_dir.resolve() / "judges")
            statuses = launch(todo, launcher, log)
    report = analyse(plan, arms, notes)
    report["runs"] = {"total": len(specs), "reused": reused, "trained": sum(s.get("status") == "done" for s in statuses)}
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": str(out / "benchmark.json"), "markdown": str(out / "benchmark.md")}
    write_json(out / "benchmark.json", report)
    (out / "benchmark.md").write_text(markdown(report))
    try:
        raise_for_statuses(statuses)
    except AblationStopped as exc:
        raise AblationStopped(str(exc).replace("run the same command to resume", "run the same benchmark command to resume")) from None
    return report


def _values(arm: Arm) -> tuple[list[int], list[float], list[float]]:
    seeds, values, accuracies = [], [], []
    for spec in arm.specs:
        result = read_result(spec.run_dir)
        if result is None or result.get("key") != spec.key:
            continue
        final = result["rows"][-1]
        seeds.append(spec.seed)
        values.append(float(final[METRIC]))
        accuracies.append(float(final.get("accuracy", math.nan)))
    return seeds, values, accuracies


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def analyse(plan: BenchmarkPlan, arms: Sequence[Arm], notes: Sequence[str] = ()) -> dict[str, Any]:
    """The report: per testbed and arm the parameters, per-seed values, mean and std; per pair
    (candidate or matched variant vs reference) the difference with its 95 % interval, the
    Holm-corrected p-value over all pairs, the verdict and the detectable difference."""
    from diffit_toolkit import __version__

    testbeds: dict[str, Any] = {}
    pairs: list[dict[str, Any]] = []
    for arm in arms:
        seeds, values, accuracies = _values(arm)
        mean = float(np.mean(values)) if values else math.nan
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        tb = testbeds.setdefault(arm.testbed, {"recipe": str(plan.testbeds[arm.testbed]), "mechanisms": {}})
        tb["mechanisms"][arm.label] = {
            "mechanism": arm.mechanism, "role": arm.role, "params": arm.params, "overrides": arm.overrides,
            "matched_to": arm.matched_to, "seeds": seeds, "values": values,
            "accuracy": [_finite(a) for a in accuracies],  # null on an unconditional testbed (plain JSON: no NaN)
            "mean": _finite(mean), "std": _finite(std), "n": len(values)}
    by_key = {(a.testbed, a.label): a for a in arms}
    for arm in arms:
        if arm.role == "reference":
            continue
        refs = arm.matched_to if arm.role == "matched" else [a.label for a in arms if a.testbed == arm.testbed and a.role == "reference"]
        for ref in refs:
            a, b = _values(arm)[1], _values(by_key[(arm.testbed, ref)])[1]
            test = welch(a, b)
            ratio = arm.params / by_key[(arm.testbed, ref)].params - 1
            pairs.append({"testbed": arm.testbed, "mechanism": arm.label, "reference": ref, "n": [len(a), len(b)],
                          "difference": _finite(test.diff), "ci95": [_finite(test.low), _finite(test.high)],
                          "p": _finite(test.p), "params_ratio": ratio,
                          "params_matched": abs(ratio) <= MATCH_TOLERANCE, "_p": test.p, "_a": a, "_b": b})
    adjusted = holm([p["_p"] for p in pairs])
    m = sum(not math.isnan(p["_p"]) for p in pairs) or 1
    for pair, q in zip(pairs, adjusted):
        a, b = pair.pop("_a"), pair.pop("_b")
        pair.pop("_p")
        pair["p_holm"] = _finite(q)
        pair["verdict"] = verdict(pair["difference"] if pair["difference"] is not None else math.nan, q, ALPHA, LOWER_IS_BETTER)
        # conservative: the detectable difference at the strictest Holm level (alpha / m)
        pair["detectable_difference"] = _finite(detectable_difference(pooled_std(a, b), len(a), len(b), ALPHA / m, POWER))
    return {"version": __version__, "metric": METRIC, "lower_is_better": LOWER_IS_BETTER, "alpha": ALPHA,
            "power": POWER, "candidate": plan.mechanism, "against": list(plan.against),
            "budget": {"steps": plan.steps, "num_images": plan.num_images, "sample_steps": plan.sample_steps,
                       "guidance_scales": list(plan.guidance_scales), "seeds": list(plan.seeds),
                       "overrides": list(plan.overrides)},
            "cache": str(plan.cache_dir), "testbeds": testbeds, "pairs": pairs, "notes": list(notes)}


def _num(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    """``benchmark.md``: per testbed a table of the arms and a table of the pairs."""
    metric = report["metric"].upper()
    lines = [f"# Benchmark: {report['candidate']} vs {', '.join(report['against'])}", "",
             f"{metric} (lower is better) at each run's best guidance scale, mean ± std over seeds. Pairs: Welch's "
             f"difference (candidate - reference) with its 95 % interval, p-values Holm-corrected over all "
             f"{len(report['pairs'])} pairs, verdict at alpha {report['alpha']:g}; *detectable* is the smallest "
             f"difference this design finds with {report['power']:.0%} power.", ""]
    for name, tb in report["testbeds"].items():
        lines += [f"## {name} (`{Path(tb['recipe']).name}`)", "",
                  f"| mechanism | role | params | seeds | {metric} | class accuracy (%) |", "|---|---|---|---|---|---|"]
        for label, arm in tb["mechanisms"].items():
            role = arm["role"] + (f" (matched to {', '.join(arm['matched_to'])})" if arm["matched_to"] else "")
            acc = [a for a in arm["accuracy"] if a is not None]
            acc_text = f"{100 * np.mean(acc):.1f}" if acc else "n/a"
            lines.append(f"| {label} | {role} | {arm['params']:,} | {arm['n']} | {_num(arm['mean'])} ± {_num(arm['std'])} "
                         f"| {acc_text} |")
        lines += ["", "| pair | params | difference (95 % CI) | p (Holm) | verdict | detectable |", "|---|---|---|---|---|---|"]
        for pair in (p for p in report["pairs"] if p["testbed"] == name):
            params = f"{pair['params_ratio']:+.0%}" + ("" if pair["params_matched"] else " (not matched)")
            low, high = pair["ci95"]
            lines.append(f"| {pair['mechanism']} vs {pair['reference']} | {params} | {_num(pair['difference'])} "
                         f"[{_num(low)}, {_num(high)}] | {_num(pair['p_holm'], '.3g')} | {pair['verdict']} "
                         f"| {_num(pair['detectable_difference'])} |")
        lines.append("")
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"
