"""``diffit-toolkit export``: a run's weights as a pretrained folder that samples without the run."""

from __future__ import annotations

from pathlib import Path

import typer

from diffit_toolkit.commands import EXIT_FAILURE, EXIT_USAGE, app, check_output, console, exit_with_error


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder (newest checkpoint) or a checkpoint step folder."),
    out: Path = typer.Argument(..., help="Folder to write: config.json, model.safetensors, sampling.json."),
    weights: str = typer.Option("ema", help="ema or model weights."),
    diffusers: bool = typer.Option(False, "--diffusers", help="Write a diffusers DiTTransformer2DModel folder "
                                   "(config.json + diffusion_pytorch_model.safetensors) instead; DiT models only."),
) -> None:
    """Export a trained model as config.json + model.safetensors (+ its sampling settings)."""
    from diffit_toolkit.generate import export_model, load_generator
    from diffit_toolkit.runs import CheckpointError

    if weights not in ("ema", "model"):
        exit_with_error(f"--weights must be ema or model, got '{weights}'", EXIT_USAGE)
    check_output(out, "output folder", folder=True)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        exit_with_error(f"{out} exists and is not an empty folder: choose a new output folder", EXIT_USAGE)
    try:
        gen = load_generator(run, device="cpu", weights=weights)
    except (CheckpointError, ValueError) as exc:
        exit_with_error(exc, EXIT_USAGE)
    if not (run / "checkpoints").is_dir() and not (run / "state.pt").is_file():
        exit_with_error(f"{run} is not a run or checkpoint folder (it is already exported weights)", EXIT_USAGE)
    if diffusers:
        from diffit_toolkit.interop.diffusers_dit import save_diffusers_dit

        try:
            path = save_diffusers_dit(gen.model, out)
        except ValueError as exc:
            exit_with_error(exc, EXIT_USAGE)
        console.print(f"wrote {path}: diffusers DiTTransformer2DModel ({weights} weights)", highlight=False)
        return
    try:
        path = export_model(gen, out)
    except CheckpointError as exc:  # non-finite weights; a full disk, a read-only target, a name too long
        exit_with_error(exc, EXIT_FAILURE)
    cfg = gen.model.config
    vae = f", VAE {gen.facts['vae']}" if gen.facts.get("vae") else ""
    console.print(f"wrote {path}: {cfg['backbone']} ({weights} weights), sampler {gen.recipe.sample.sampler} "
                  f"{gen.recipe.sample.steps} steps{vae}", highlight=False)
