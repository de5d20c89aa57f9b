"""``diffit-toolkit cache-latents``: encode an image folder into a latent cache once."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from diffit_toolkit.commands import NO_PROGRESS_HELP, app, check_device, console, progress_bar, usage_errors
from diffit_toolkit.errors import RunFailure, ToolkitError


@app.command("cache-latents")
def cache_latents(
    data_path: Path = typer.Argument(..., help="Image folder: class subfolders (--classes) or flat (--flat)."),
    out_dir: Path = typer.Argument(..., help="Cache folder to write (shards + meta.json); re-running resumes."),
    vae: str = typer.Option(None, "--vae", help="diffusers AutoencoderKL folder, or a hub id already in the local cache "
                                                "(default: stabilityai/sd-vae-ft-ema)."),
    resolution: int = typer.Option(256, "--resolution", help="Image side encoded (center crop + resize)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per VAE call."),
    shard_size: int = typer.Option(4096, "--shard-size", help="Images per shard file."),
    device: str = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
    conditional: bool = typer.Option(True, "--classes/--flat", help="Class subfolders as labels, or one flat unconditional folder."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16 or float32."),
    sample: bool = typer.Option(False, "--sample/--mean", help="Store a posterior sample (DiT) or the posterior mean."),
    seed: int = typer.Option(0, "--seed", help="Seed of posterior samples."),
    on_bad_file: str = typer.Option("skip", "--on-bad-file", help="skip (count and list) or stop at unreadable images."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers reading images."),
    no_progress: bool = typer.Option(False, "--no-progress", help=NO_PROGRESS_HELP),
) -> None:
    """Encode images (plain and mirrored) with a VAE into safetensors shards and record the latent scale."""
    from diffit_toolkit.data.cache import cache_latents as _cache_latents
    from diffit_toolkit.data.vae import DEFAULT_VAE

    vae = vae or DEFAULT_VAE
    device = str(check_device(device))
    try:  # a ValueError: a wrong --vae, data folder or option; a BadImageError (--on-bad-file stop): exit 2
        with usage_errors(ValueError), progress_bar("encoding", enabled=not no_progress) as update:
            meta = _cache_latents(
                data_path, out_dir, vae, resolution=resolution, batch_size=batch_size, shard_size=shard_size, device=device,
                conditional=conditional, dtype=dtype, sample=sample, seed=seed, on_bad_file=on_bad_file, num_workers=workers,
                progress=update,
            )
    except ToolkitError:  # its own exit code
        raise
    except OSError as exc:
        raise RunFailure(f"could not write {exc.filename or out_dir} ({exc.strerror or exc})") from exc
    table = Table(title=f"latent cache {escape(str(out_dir))}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    classes = f"{meta.num_classes} ({', '.join(meta.class_names[:5])}{', ...' if meta.num_classes > 5 else ''})" if meta.class_names else "0 (unconditional)"
    for field, value in (
        ("images", f"{meta.num_items} (each stored plain and flipped)"),
        ("latents", f"{meta.channels}x{meta.resolution}x{meta.resolution} {meta.dtype} ({meta.stored}) from {meta.image_resolution}px"),
        ("classes", classes),
        ("shards", str(len(meta.shards))),
        ("latent scale", f"{meta.latent_scale:g}"),
        ("vae", meta.vae),
        ("skipped files", str(len(meta.skipped))),
    ):
        table.add_row(field, escape(value))
    console.print(table)
    for file in meta.skipped:
        console.print(f"[yellow]skipped:[/yellow] {escape(file)}", soft_wrap=True)
