"""``diffit-toolkit benchmark``: rank a conditioning mechanism (a user's plugin included) against
references on the CPU testbeds, with seeds, parameter matching and corrected statistics."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_toolkit.commands import app, check_device, console, usage_errors
from diffit_toolkit.commands.eval import JOBS_HELP, LAUNCHER_HELP, sweep_launcher
from diffit_toolkit.errors import UsageError


@app.command("benchmark")
def benchmark(
    mechanism: str = typer.Argument(..., help="The mechanism to rank (a registered name; load your own with -p my_mech.py)."),
    against: str = typer.Option("tmsa,adaln_zero", help="Comma-separated reference mechanisms."),
    testbeds: str = typer.Option(None, help="Comma-separated testbeds: built-in names, recipe files or name=recipe.yaml (default: the built-in CPU testbeds)."),
    seeds: str = typer.Option("5", help="Seeds per mechanism: a count (5: seeds 0..4) or comma-separated seeds; at least 2."),
    steps: int = typer.Option(None, min=1, help="Training budget (train.max_steps) of every run (default: each testbed's)."),
    num_images: int = typer.Option(200, min=2, help="Samples per score."),
    sample_steps: int = typer.Option(None, min=1, help="Sampling steps (default: each testbed's)."),
    guidance_scales: str = typer.Option("1,1.5,2,3", "--guidance-scales", help="Scales tried on conditional testbeds; each run is scored at its best."),
    set_: list[str] = typer.Option([], "--set", help="Override applied to every run, e.g. train.batch_size=32 (repeatable; part of the cache key)."),
    out: Path = typer.Option(Path("runs/benchmark"), help="Output folder (benchmark.json, benchmark.md)."),
    cache: Path = typer.Option(None, help="Run cache shared between benchmarks (default: <out>/runs): references are trained once."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help=JOBS_HELP),
    launcher: str = typer.Option("local", help=LAUNCHER_HELP),
    partition: str = typer.Option(None, help="SLURM partition (--launcher slurm)."),
    time_min: int = typer.Option(60, "--time", min=1, help="SLURM time limit per job, minutes (--launcher slurm)."),
    gpus: int = typer.Option(0, min=0, help="GPUs per SLURM job (--launcher slurm)."),
    cpus: int = typer.Option(None, min=1, help="CPUs per SLURM job (--launcher slurm; default 10 per GPU, else 4)."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: rank from the runs already in the cache."),
) -> None:
    """Rank MECHANISM against references: train each on each testbed with several seeds, score each at its best guidance scale, and report differences with 95 % intervals, Holm-corrected p-values and verdicts (benchmark.json, benchmark.md). Finished runs are cached and reused."""
    from diffit_toolkit.eval.benchmark import BenchmarkPlan, parse_seeds, resolve_testbeds, run_benchmark
    from diffit_toolkit.eval.sweep import parse_scales

    device = str(check_device(device))
    with usage_errors(ValueError, OSError):  # an option, testbed or recipe file that is wrong
        chosen = sweep_launcher(launcher, jobs, partition, time_min, gpus, cpus)
        references = [a.strip() for a in against.split(",") if a.strip()]
        if not references:
            raise UsageError("--against is empty: name at least one reference mechanism, e.g. --against tmsa")
        plan = BenchmarkPlan(mechanism=mechanism, against=references, testbeds=resolve_testbeds(testbeds),
                             seeds=parse_seeds(seeds), out=out, cache=cache, steps=steps, num_images=num_images,
                             sample_steps=sample_steps, guidance_scales=parse_scales(guidance_scales),
                             overrides=list(set_), device=device)
        report = run_benchmark(plan, chosen, log=lambda line: console.print(line, highlight=False), report_only=report_only)
    console.print(Path(report["files"]["markdown"]).read_text(), highlight=False, soft_wrap=True)
    for path in report["files"].values():
        console.print(f"wrote {path}", highlight=False)
