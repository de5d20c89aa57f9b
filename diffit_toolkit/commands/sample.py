"""``diffit-toolkit sample``: images from a trained run as a PNG grid, an ADM ``.npz`` and/or one PNG per image."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from diffit_toolkit.commands import NO_PROGRESS_HELP, app, check_output, finite, parse_guidance_interval, usage_errors
from diffit_toolkit.errors import RunFailure, ToolkitError, UsageError

console = Console()


def _classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise typer.BadParameter(f"--classes takes comma-separated integers, got '{text}'") from None


def _default_grid(run: Path) -> Path:
    """``<run>/samples/sample.png`` for a run or step folder, ``<name>_samples.png`` beside other weights."""
    if (run / "checkpoints").is_dir():
        return run / "samples" / "sample.png"
    if (run / "state.pt").is_file():
        return run.parent.parent / "samples" / "sample.png"
    return run.parent / f"{run.stem}_samples.png"


@app.command()
def sample(
    run: Path = typer.Argument(..., help="Run folder (newest checkpoint), checkpoint step folder, exported folder "
                                         "or a single .safetensors / .pt weights file."),
    out: Path = typer.Option(None, help="PNG grid to write (default, unless --npz or --png-dir is given: samples/sample.png in the run folder, or NAME_samples.png beside a weights file)."),
    npz: Path = typer.Option(None, help="Also write the images as an ADM-layout .npz (uint8 NHWC + labels)."),
    png_dir: Path = typer.Option(None, help="Also write one PNG per image into this folder (INDEX_classLABEL.png), for "
                                            "evaluators that read folders; a rerun with the same settings skips the "
                                            "images already there."),
    num: int = typer.Option(64, "--num", "-n", min=1, help="Number of images (under torchrun write -n: torchrun's own "
                                                            "parser takes --num for its --numa-binding)."),
    classes: str = typer.Option(None, help="Comma-separated class labels to cycle through (default: all)."),
    sampler: str = typer.Option(None, help="Sampler (default: the recipe's): ddpm, ddim, dpm_solver++ or "
                                           "diffusers:CLASS (any diffusers scheduler) for a Gaussian process; heun "
                                           "for EDM; euler or heun for flow."),
    steps: int = typer.Option(None, min=1, help="Sampling steps (default: the recipe's)."),
    guidance_scale: float = typer.Option(None, callback=finite, help="Classifier-free guidance scale (1: off)."),
    guidance_schedule: str = typer.Option(None, help="constant or power_cosine."),
    guidance_interval: str = typer.Option(None, help="Guide only inside LO,HI (fractions of the noise range, e.g. "
                                                     "0.29,0.59; 'none': everywhere; default: the recipe's)."),
    guided_channels: int = typer.Option(None, min=1, help="Guide only the first k output channels."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Sampling seed (image i is drawn from seed and i: the same whatever --batch-size)."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward batch."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    weights: str = typer.Option("ema", help="ema or model weights."),
    recipe: Path = typer.Option(None, help="Recipe (file or shipped name) whose diffusion and sample settings apply: "
                                           "needed for bare weights, which carry none (default: DiT's)."),
    vae: str = typer.Option(None, help="VAE folder or hub id that decodes a latent model's samples (overrides the recorded one)."),
    no_progress: bool = typer.Option(False, "--no-progress", help=NO_PROGRESS_HELP),
) -> None:
    """Sample images from a trained model.

    Under torchrun --nproc_per_node=N every process draws its share of the images and rank 0 joins the shards into one --npz file: the same file, byte for byte, as one process writes.
    """
    import pydantic
    from PIL import Image

    from diffit_toolkit.commands import check_device, progress_bar
    from diffit_toolkit.inference.pipeline import load_pipeline
    from diffit_toolkit.inference.writers import shard_range, write_samples
    from diffit_toolkit.process import resolve_sampler
    from diffit_toolkit.recipe import SampleSection
    from diffit_toolkit.runs import confined
    from diffit_toolkit.train.distributed import barrier, cleanup_distributed, setup_distributed

    for option, path, suffixes in (("--out", out, tuple(Image.registered_extensions())), ("--npz", npz, (".npz",))):
        check_output(path, option)
        if path is not None and (path.is_dir() or path.suffix.lower() not in suffixes):
            what = "a folder" if path.is_dir() else "not an image file name" if option == "--out" else "not an .npz file name"
            raise UsageError(f"{option} {path} is {what}; give a file path ending in {'.png' if option == '--out' else '.npz'}")
    check_output(png_dir, "--png-dir", folder=True)
    if png_dir is not None and png_dir.exists() and not png_dir.is_dir():
        raise UsageError(f"--png-dir {png_dir} is a file; give a folder")
    check_device(device)
    overrides = {k: v for k, v in dict(sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                                       guidance_schedule=guidance_schedule, guided_channels=guided_channels).items()
                 if v is not None}
    if guidance_interval is not None:
        with usage_errors(ValueError):
            overrides["guidance_interval"] = parse_guidance_interval(guidance_interval)
    env = setup_distributed(device)  # one process, or this process's rank under torchrun / SLURM
    try:
        if env.distributed and npz is None and png_dir is None:
            raise UsageError(f"sampling on {env.world_size} processes writes an .npz or PNG files: give --npz PATH "
                             f"(and --out for a grid, drawn by rank 0) or --png-dir DIR")
        with usage_errors(ValueError):  # a run, weights or setting that cannot sample
            gen = load_pipeline(run, device=str(env.device), weights=weights, recipe=recipe, vae=vae)
            if env.is_main:
                for note in gen.notes:
                    console.print(f"warning: {note}", soft_wrap=True, highlight=False)
            try:
                settings = SampleSection.model_validate({**gen.recipe.sample.model_dump(), **overrides})
            except pydantic.ValidationError as exc:
                err = exc.errors()[0]
                name = str(err["loc"][0]) if err["loc"] else "sample"
                flag = f"--{name.replace('_', '-')}" if name in overrides else f"the run's sample.{name}"
                raise ValueError(f"{flag}: {err['msg'][0].lower() + err['msg'][1:]} (got {err.get('input')})") from None
            resolve_sampler(gen.recipe.diffusion.process, settings.sampler)
            chosen = _classes(classes)
            gen.labels(chosen, 1)  # a wrong class is reported before any sampling
        grid = out or (_default_grid(run) if npz is None and png_dir is None else None)
        if out is None and grid is not None and grid.parent.name == "samples":
            confined(grid.parent.parent, grid)  # the default grid, in the run folder: never through a link there
        share = len(shard_range(num, batch_size, env.rank, env.world_size))  # this process's images
        label = f"sampling (rank 0 of {env.world_size})" if env.distributed else "sampling"
        try:  # a ValueError: e.g. a VAE that cannot be loaded, a latent model without one
            with usage_errors(ValueError), progress_bar(label, total=share,
                                                        enabled=env.is_main and not no_progress) as update:
                written = write_samples(gen, num, settings, npz=npz, grid=grid, png_dir=png_dir, classes=chosen,
                                        batch_size=batch_size, seed=seed, progress=update, rank=env.rank,
                                        world_size=env.world_size, barrier=lambda: barrier(env),
                                        source=f"{run.resolve()} ({weights} weights)")
        except ToolkitError:  # its own exit code
            raise
        except OSError as exc:
            raise RunFailure(f"could not write {exc.filename or 'the output'} ({exc.strerror or exc})") from exc
    finally:
        cleanup_distributed()
    for path in written:
        console.print(f"wrote {path}", highlight=False)
