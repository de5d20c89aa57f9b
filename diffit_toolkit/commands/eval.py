"""``diffit-toolkit eval`` (FID/KID/IS/PR or the offline digits metric) and ``diffit-toolkit ablate``."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_toolkit.commands import (NO_PROGRESS_HELP, app, check_device, console, finite, parse_guidance_interval,
                                     progress_bar, usage_errors)
from diffit_toolkit.errors import RunFailure, UsageError


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--seeds takes comma-separated integers, got '{text}'") from None


@app.command("eval")
def eval_(
    samples: Path = typer.Argument(..., help="Samples: an image folder or an ADM-layout .npz (as diffit-toolkit sample --npz writes)."),
    ref: Path = typer.Option(None, "--ref", help="Reference: an image folder, an .npz, or an ADM reference batch (mu/sigma)."),
    metric: str = typer.Option("auto", help="inception (FID/KID/IS/PR), digits, shapes, digits_canvas or shapes_canvas (offline), or auto: the data set's judge without --ref (a run: its data's judge; images: 8x8 digits, 32x32 shapes, 16x16 digits_canvas), inception with it."),
    inception_weights: Path = typer.Option(None, help="Local Inception weights file (torch-fidelity's FID Inception, a .pth file); nothing is downloaded: without the file, the error says which one to fetch."),
    fid: bool = typer.Option(True, help="Frechet Inception Distance."),
    kid: bool = typer.Option(True, help="Kernel Inception Distance (needs reference images)."),
    isc: bool = typer.Option(True, "--is/--no-is", help="Inception Score."),
    prc: bool = typer.Option(True, "--prc/--no-prc", help="Precision and recall (needs reference images)."),
    kid_subset_size: int = typer.Option(1000, min=2, help="KID subset size (capped at the smaller set)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    no_progress: bool = typer.Option(False, "--no-progress", help=NO_PROGRESS_HELP),
    guidance_scales: str = typer.Option(None, "--guidance-scales", help="Run or checkpoint input: sample at each of these comma-separated guidance scales and score each (default: the recipe's scale)."),
    num: int = typer.Option(1000, min=2, help="Run or checkpoint input: samples per guidance scale."),
    sampler: str = typer.Option(None, help="Run or checkpoint input: sampler (default: the recipe's)."),
    steps: int = typer.Option(None, min=1, help="Run or checkpoint input: sampling steps (default: the recipe's)."),
    seed: int = typer.Option(0, help="Run or checkpoint input: sampling seed (the same noise at every scale)."),
    plot: Path = typer.Option(None, help="Run or checkpoint input: write the guidance trade-off plot to this PNG file."),
    csv_out: Path = typer.Option(None, "--csv", help="Run or checkpoint input: write one row per guidance scale to this CSV."),
    guidance_interval: str = typer.Option(None, help="Run or checkpoint input: guide only inside LO,HI (fractions of the noise range, e.g. 0.29,0.59; 'none': everywhere; default: the recipe's)."),
) -> None:
    """Score samples: FID, KID, IS and precision/recall against a reference, or the offline digits / shapes / canvas metric.

    SAMPLES may also be a run or checkpoint folder: it is then sampled (--num images at each of the --guidance-scales) and every scale is scored, with a trade-off plot (--plot).
    """
    import json

    from diffit_toolkit.eval.inputs import InputError, load_image_set
    from diffit_toolkit.eval.metrics import evaluate_sets, inception_extractor

    if metric not in ("auto", "inception", *OFFLINE_SIZES):
        raise UsageError(f"--metric must be auto, inception, {', '.join(OFFLINE_SIZES)}, got '{metric}'")
    if json_out is not None and (json_out.is_dir() or json_out.suffix.lower() != ".json"):
        raise UsageError(f"--json {json_out} is {'a folder' if json_out.is_dir() else 'not a .json file name'}; give a file path ending in .json")
    device = str(check_device(device))
    if _is_checkpoint_input(samples):
        _sweep(samples, ref, metric, inception_weights, json_out, device, guidance_scales, num, sampler, steps, seed,
               plot, csv_out, guidance_interval, not no_progress)
        return
    if guidance_scales is not None or plot is not None or csv_out is not None or guidance_interval is not None:
        raise UsageError(f"{samples}: --guidance-scales, --guidance-interval, --plot and --csv sample a model: give a run or checkpoint folder, not images")
    with usage_errors(ValueError, OSError):  # samples or a reference that cannot be read
        if metric == "inception" or (metric == "auto" and ref is not None):
            with progress_bar("Inception features", enabled=not no_progress) as update:
                extractor = inception_extractor(inception_weights, device=device, progress=update)  # fails fast without weights
                fake = load_image_set(samples)
                reference = load_image_set(ref) if ref is not None else None
                if reference is None and not isc:
                    raise InputError("nothing to compute: give --ref for FID/KID/PR or keep --is")
                result = evaluate_sets(fake, reference, extractor, fid=fid, kid=kid, isc=isc, prc=prc,
                                       kid_subset_size=kid_subset_size)
            names = {"fid": "FID", "kid_mean": "KID", "is_mean": "IS", "precision": "precision", "recall": "recall"}
            parts = []
            for key, label in names.items():
                if key in result:
                    std = result.get(key.replace("_mean", "_std")) if key.endswith("_mean") else None
                    parts.append(f"{label} {result[key]:.4g}" + (f" ± {std:.2g}" if std is not None else ""))
            line = "  ".join(parts) + f"  (n={int(result['num_samples'])})"
        else:
            if ref is not None:
                raise InputError(f"the {metric} metric compares with held-out real images of its data set; drop --ref")
            fake = load_image_set(samples)
            if metric == "auto":
                metric = next((name for name, size in OFFLINE_SIZES.items() if size == fake.size), "")
            if fake.size != OFFLINE_SIZES.get(metric):
                raise InputError(f"{samples}: {fake.size[0]}x{fake.size[1]} images: the digits metric takes 8x8 digits, the shapes metric 32x32 shapes, the digits_canvas and shapes_canvas metrics 16x16 canvases; give --ref (and --inception-weights) for other data")
            score = _offline_metric_class(metric)().score(fake.images, fake.labels)
            result = score.as_dict()
            line = score.line()
            if fake.labels is None:
                line += "  (no labels in the input: accuracy needs an .npz with arr_1)"
    console.print(line, highlight=False)
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise RunFailure(f"could not write {json_out} ({exc.strerror or exc})") from exc
        console.print(f"wrote {json_out}", highlight=False)


def _is_checkpoint_input(path: Path) -> bool:
    """A run folder (with ``checkpoints/``) or one checkpoint folder (with ``config.json``)."""
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / "config.json").is_file())


def _sweep(run: Path, ref: Path | None, metric: str, inception_weights: Path | None, json_out: Path | None, device: str,
           scales_text: str | None, num: int, sampler: str | None, steps: int | None, seed: int,
           plot: Path | None, csv_out: Path | None, interval_text: str | None = None, show_progress: bool = True) -> None:
    """``eval RUN``: sample a checkpoint at one or more guidance scales and score every scale."""
    import json

    from diffit_toolkit.eval.inputs import InputError, load_image_set
    from diffit_toolkit.eval.metrics import inception_extractor
    from diffit_toolkit.eval.sweep import (
        best_row,
        canvas_judge,
        digits_judge,
        guidance_sweep,
        inception_judge,
        parse_scales,
        plot_guidance_sweep,
        shapes_canvas_judge,
        shapes_judge,
        write_sweep_csv,
    )
    from diffit_toolkit.inference.pipeline import load_pipeline
    from diffit_toolkit.process import resolve_sampler
    from diffit_toolkit.recipe import SampleSection

    with usage_errors(ValueError, OSError):  # a reference, metric or setting that does not fit the run
        with progress_bar("sampling", enabled=show_progress) as update:
            gen = load_pipeline(run, device=device)
            if not gen.num_classes:
                raise InputError(f"{run}: the model is unconditional: there is no guidance to sweep")
            if metric == "auto":
                metric = "inception" if ref is not None else _offline_metric(gen.facts, gen.recipe.data.get("kind"))
            if metric == "inception":
                if ref is None:
                    raise InputError("the Inception metrics of a run need --ref (the real images or an ADM reference batch)")
                judge = inception_judge(load_image_set(ref), inception_extractor(inception_weights, device=device, progress=update))
                x_key, y_key, key = "is_mean", "fid", "fid"
            else:
                if ref is not None:
                    raise InputError(f"the {metric} metric compares with held-out real images of its data set; drop --ref")
                fitting = _offline_metric(gen.facts, gen.recipe.data.get("kind"))
                if metric != fitting:
                    takes = {"digits": "8x8 gray digits", "shapes": "32x32 RGB shapes", "digits_canvas": "16x16 gray digit canvases",
                             "shapes_canvas": "16x16 gray shape canvases"}[metric]
                    raise InputError(f"the {metric} metric takes {takes}, this model makes {fitting}: use --metric {fitting}")
                judge = {"digits": digits_judge, "shapes": shapes_judge, "digits_canvas": canvas_judge,
                         "shapes_canvas": shapes_canvas_judge}[metric]()
                x_key, y_key, key = "accuracy", "fd", "fd"
            overrides = {k: v for k, v in dict(sampler=sampler, steps=steps).items() if v is not None}
            if interval_text is not None:
                overrides["guidance_interval"] = parse_guidance_interval(interval_text)
            settings = SampleSection.model_validate({**gen.recipe.sample.model_dump(), **overrides})
            resolve_sampler(gen.recipe.diffusion.process, settings.sampler)
            scales = parse_scales(scales_text) if scales_text else [settings.guidance_scale]
            rows = guidance_sweep(gen, scales, settings, num, judge, seed=seed,
                                  log=lambda line: console.print(line, highlight=False), progress=update)
    if len(rows) > 1:
        best = best_row(rows, key)
        console.print(f"best {key.upper()} {best[key]:.4g} at guidance {best['guidance_scale']:g}", highlight=False)
    if csv_out is not None:
        console.print(f"wrote {write_sweep_csv(rows, csv_out)}", highlight=False)
    if plot is not None:
        floor = rows[0].get("floor") if y_key == "fd" else None
        name = f"{settings.sampler} {settings.steps} steps" + (
            f", guidance in [{settings.guidance_interval[0]:g}, {settings.guidance_interval[1]:g}]" if settings.guidance_interval else "")
        console.print(f"wrote {plot_guidance_sweep({name: rows}, plot, x=x_key, y=y_key, floor=floor)}", highlight=False)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows if len(rows) > 1 else rows[0], indent=2) + "\n")
        console.print(f"wrote {json_out}", highlight=False)


#: Image size (width, height) each offline metric takes.
OFFLINE_SIZES = {"digits": (8, 8), "shapes": (32, 32), "digits_canvas": (16, 16), "shapes_canvas": (16, 16)}


def _offline_metric_class(name: str):
    """The metric class of an offline judge named in ``OFFLINE_SIZES``."""
    if name == "shapes":
        from diffit_toolkit.eval.shapes import ShapesMetric as Metric
    elif name == "digits_canvas":
        from diffit_toolkit.eval.canvas import CanvasMetric as Metric
    elif name == "shapes_canvas":
        from diffit_toolkit.eval.shapes_canvas import ShapesCanvasMetric as Metric
    else:
        from diffit_toolkit.eval.digits import DigitsMetric as Metric
    return Metric


def _offline_metric(facts: dict, kind: str | None = None) -> str:
    """The offline judge that fits a model's data: its data kind's when that has one of the offline
    metrics, else by shape: digits (1x8x8, 10 classes), shapes (3x32x32, 10 classes) or
    digits_canvas (1x16x16, unconditional or 10 classes)."""
    from diffit_toolkit.eval.inputs import InputError

    if kind in OFFLINE_SIZES:
        return kind
    shape = (facts.get("channels"), facts.get("resolution"), facts.get("num_classes"))
    if shape == (1, 8, 10):
        return "digits"
    if shape == (3, 32, 10):
        return "shapes"
    if shape in ((1, 16, 0), (1, 16, 10)):
        return "digits_canvas"
    raise InputError(f"no offline judge for {shape[0]}x{shape[1]}x{shape[1]} data with {shape[2]} classes: give --ref and --inception-weights")


#: Help of the options every sweep command (ablate, benchmark) shares. Typer reads help as rich
#: markup, so the ``[`` of ``[cluster]`` is escaped (unescaped, rich drops ``[cluster]`` as a style tag).
JOBS_HELP = ("Jobs at once: 1 runs them one after another in this process; N > 1 starts N worker processes "
             "(CPU threads split between them, one GPU each); with --launcher slurm, the array's parallelism.")
LAUNCHER_HELP = ("Where the jobs run: local (this machine), slurm (one SLURM job per run through submitit: "
                 "pip install 'diffit-toolkit\\[cluster]'), or submitit-local (the SLURM path on this machine, to check a "
                 "setup).")


def sweep_launcher(launcher: str, jobs: int, partition: str | None, time_min: int, gpus: int, cpus: int | None):
    """The [`Launcher`][diffit_toolkit.eval.jobs.Launcher] of the shared sweep options (checked: one line when wrong)."""
    from diffit_toolkit.eval.jobs import Launcher

    chosen = Launcher(kind=launcher, jobs=jobs, partition=partition, time_min=time_min, gpus=gpus, cpus=cpus)
    if launcher == "local" and (partition or gpus):
        raise UsageError("--partition and --gpus are SLURM options: add --launcher slurm")
    chosen.check()
    return chosen


@app.command("ablate")
def ablate(
    recipes: list[Path] = typer.Argument(..., help="Recipe files (one per mechanism) or one ablation suite YAML."),
    seeds: str = typer.Option(None, help="Comma-separated training seeds (default: the suite's, else 0,1,2)."),
    set_: list[str] = typer.Option([], "--set", help="Override applied to every recipe, e.g. train.max_steps=500 (repeatable)."),
    eval_every: int = typer.Option(None, min=0, help="Evaluate every N training steps (0: final step only)."),
    num_images: int = typer.Option(None, min=2, help="Samples per evaluation (default 200)."),
    sample_steps: int = typer.Option(None, min=1, help="Sampling steps (default: the suite's, else each recipe's)."),
    guidance_scale: float = typer.Option(None, min=0, callback=finite, help="Guidance scale (default: the suite's, else each recipe's)."),
    guidance_scales: str = typer.Option(None, "--guidance-scales", help="Sweep these comma-separated scales at the final checkpoint and report each recipe at its best FD."),
    out: Path = typer.Option(None, help="Output folder (default: the suite's, else runs/ablation)."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help=JOBS_HELP),
    launcher: str = typer.Option("local", help=LAUNCHER_HELP),
    partition: str = typer.Option(None, help="SLURM partition (--launcher slurm)."),
    time_min: int = typer.Option(60, "--time", min=1, help="SLURM time limit per job, minutes (--launcher slurm)."),
    gpus: int = typer.Option(0, min=0, help="GPUs per SLURM job (--launcher slurm)."),
    cpus: int = typer.Option(None, min=1, help="CPUs per SLURM job (--launcher slurm; default 10 per GPU, else 4)."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: rebuild the table, CSVs and plots from the finished run folders."),
) -> None:
    """Train each recipe for the same budget with several seeds, sample, score, and write a table and a plot.

    Every (recipe, seed) is one job in its own run folder, <out>/<recipe>/seed_<s>, that trains, scores and writes result.json; the reports are rebuilt from the folders. Run the same command again to skip finished runs and resume stopped ones.
    """
    from diffit_toolkit.eval.ablation import AblationSuite, is_suite_file, load_suite, run_ablation

    device = str(check_device(device))
    with usage_errors(ValueError, OSError):  # an option, suite or recipe file that is wrong
        chosen = sweep_launcher(launcher, jobs, partition, time_min, gpus, cpus)
        missing = [p for p in recipes if not p.is_file()]
        if missing:
            raise UsageError(f"no such recipe or suite file: {missing[0]}")
        if len(recipes) == 1 and is_suite_file(recipes[0]):
            suite = load_suite(recipes[0])
        else:
            if any(is_suite_file(p) for p in recipes):
                raise UsageError("give either one suite file or recipe files, not both")
            suite = AblationSuite(recipes=list(recipes))
        suite.seeds = _seeds(seeds) or suite.seeds
        suite.overrides = [*suite.overrides, *set_]
        if guidance_scales is not None:
            from diffit_toolkit.eval.sweep import parse_scales

            suite.guidance_scales = parse_scales(guidance_scales)
        for name, value in (("eval_every", eval_every), ("num_images", num_images), ("sample_steps", sample_steps),
                            ("guidance_scale", guidance_scale), ("out", out)):
            if value is not None:
                setattr(suite, name, value)
        files = run_ablation(suite, device=device, log=lambda line: console.print(line, highlight=False),
                             launcher=chosen, report_only=report_only)
    console.print(Path(files["table_md"]).read_text(), highlight=False)
    for kind in ("table_md", "table_csv", "runs", "curves", "plot", "guidance", "guidance_plot"):
        if kind in files:
            console.print(f"wrote {files[kind]}", highlight=False)
