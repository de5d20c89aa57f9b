"""``diffit-toolkit eval`` (FID/KID/IS/PR or the offline digits metric) and ``diffit-toolkit ablate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from diffit_toolkit.commands import app, exit_with_error, finite

console = Console()


def _fail(message: str) -> None:
    exit_with_error(message, 2)


def _seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"--seeds takes comma-separated integers, got '{text}'") from None


@app.command("eval")
def eval_(
    samples: Path = typer.Argument(..., help="Samples: an image folder or an ADM-layout .npz (from `diffit-toolkit sample --npz`)."),
    ref: Path = typer.Option(None, "--ref", help="Reference: an image folder, an .npz, or an ADM reference batch (mu/sigma)."),
    metric: str = typer.Option("auto", help="inception (FID/KID/IS/PR), digits (offline), or auto: digits for 8x8 samples without --ref."),
    inception_weights: Path = typer.Option(None, help="Local Inception weights file (weights-inception-2015-12-05-6726825d.pth); nothing is downloaded."),
    fid: bool = typer.Option(True, help="Frechet Inception Distance."),
    kid: bool = typer.Option(True, help="Kernel Inception Distance (needs reference images)."),
    isc: bool = typer.Option(True, "--is/--no-is", help="Inception Score."),
    prc: bool = typer.Option(True, "--prc/--no-prc", help="Precision and recall (needs reference images)."),
    kid_subset_size: int = typer.Option(1000, min=2, help="KID subset size (capped at the smaller set)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Score samples: FID, KID, IS and precision/recall against a reference, or the offline digits metric."""
    import json

    from diffit_toolkit.eval.inputs import InputError, load_image_set
    from diffit_toolkit.eval.metrics import MissingWeightsError, evaluate_sets, inception_extractor

    if metric not in ("auto", "inception", "digits"):
        _fail(f"--metric must be auto, inception or digits, got '{metric}'")
    if json_out is not None and (json_out.is_dir() or json_out.suffix.lower() != ".json"):
        _fail(f"--json {json_out} is {'a folder' if json_out.is_dir() else 'not a .json file name'}; give a file path ending in .json")
    try:
        if metric == "inception" or (metric == "auto" and ref is not None):
            extractor = inception_extractor(inception_weights, device=device)  # fails fast without weights
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
            from diffit_toolkit.eval.digits import DigitsMetric

            if ref is not None:
                raise InputError("the digits metric compares with the held-out real digits; drop --ref")
            fake = load_image_set(samples)
            if fake.size != (8, 8):
                raise InputError(f"{samples}: {fake.size[0]}x{fake.size[1]} images: the digits metric takes 8x8 digits; give --ref (and --inception-weights) for other data")
            score = DigitsMetric().score(fake.images, fake.labels)
            result = score.as_dict()
            line = score.line()
            if fake.labels is None:
                line += "  (no labels in the input: accuracy needs an .npz with arr_1)"
    except (InputError, MissingWeightsError, ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(line, highlight=False)
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            exit_with_error(f"could not write {json_out} ({exc.strerror or exc})", 1)
        console.print(f"wrote {json_out}", highlight=False)


@app.command("ablate")
def ablate(
    recipes: list[Path] = typer.Argument(..., help="Recipe files (one per mechanism) or one ablation suite YAML."),
    seeds: str = typer.Option(None, help="Comma-separated training seeds (default: the suite's, else 0,1,2)."),
    set_: list[str] = typer.Option([], "--set", help="Override applied to every recipe, e.g. train.max_steps=500 (repeatable)."),
    eval_every: int = typer.Option(None, min=0, help="Evaluate every N training steps (0: final step only)."),
    num_images: int = typer.Option(None, min=2, help="Samples per evaluation (default 200)."),
    sample_steps: int = typer.Option(None, min=1, help="Sampling steps (default: the suite's, else each recipe's)."),
    guidance_scale: float = typer.Option(None, min=0, callback=finite, help="Guidance scale (default: the suite's, else each recipe's)."),
    out: Path = typer.Option(None, help="Output folder (default: the suite's, else runs/ablation)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Train each recipe for the same budget with several seeds, sample, score, and write a table and a plot."""
    from diffit_toolkit.eval.ablation import AblationSuite, is_suite_file, load_suite, run_ablation
    from diffit_toolkit.recipe import RecipeError

    try:
        missing = [p for p in recipes if not p.is_file()]
        if missing:
            raise ValueError(f"no such recipe or suite file: {missing[0]}")
        if len(recipes) == 1 and is_suite_file(recipes[0]):
            suite = load_suite(recipes[0])
        else:
            if any(is_suite_file(p) for p in recipes):
                raise ValueError("give either one suite file or recipe files, not both")
            suite = AblationSuite(recipes=list(recipes))
        suite.seeds = _seeds(seeds) or suite.seeds
        suite.overrides = [*suite.overrides, *set_]
        for name, value in (("eval_every", eval_every), ("num_images", num_images), ("sample_steps", sample_steps),
                            ("guidance_scale", guidance_scale), ("out", out)):
            if value is not None:
                setattr(suite, name, value)
        files = run_ablation(suite, device=device, log=lambda line: console.print(line, highlight=False))
    except (RecipeError, ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(Path(files["table_md"]).read_text(), highlight=False)
    for kind in ("table_md", "table_csv", "runs", "curves", "plot"):
        console.print(f"wrote {files[kind]}", highlight=False)
