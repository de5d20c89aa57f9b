"""``diffit-toolkit export``: a run's weights as a pretrained folder that samples without the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from diffit_toolkit.commands import app, check_output, console, usage_errors
from diffit_toolkit.errors import UsageError


def _checkpoint_record(run: Path) -> tuple[Path, dict[str, Any], int | None]:
    """``(run folder, the checkpoint's resolved recipe, its step)`` of a run or step folder."""
    from diffit_toolkit.errors import read_json_object
    from diffit_toolkit.interop.weights import checkpoint_folder
    from diffit_toolkit.runs.checkpoint import checkpoint_step

    checkpoint = checkpoint_folder(run)
    run_dir = run if checkpoint != run else run.parent.parent
    config = read_json_object(checkpoint / "config.json", "a checkpoint config")
    return run_dir, dict(config.get("recipe") or {}), checkpoint_step(checkpoint)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder (newest checkpoint) or a checkpoint step folder."),
    out: Path = typer.Argument(..., help="Folder to write: config.json, model.safetensors, sampling.json and the "
                                         "model card README.md."),
    weights: str = typer.Option("ema", help="ema or model weights."),
    diffusers: bool = typer.Option(False, "--diffusers", help="Write a diffusers DiTTransformer2DModel folder "
                                   "(config.json + diffusion_pytorch_model.safetensors) instead; DiT models only."),
    diffusers_pipeline: bool = typer.Option(False, "--diffusers-pipeline", help="Write a complete diffusers "
                                            "DiTPipeline folder instead (transformer/, scheduler/, vae/, "
                                            "model_index.json): DiT models of the gaussian process with a VAE."),
    vae: str = typer.Option(None, help="VAE folder or hub id copied into a --diffusers-pipeline folder (default: "
                                       "the run's recorded VAE)."),
    license_id: str = typer.Option("other", "--license", help="License id written into the model card's metadata "
                                                          "(e.g. mit, apache-2.0, cc-by-nc-4.0)."),
) -> None:
    """Export a trained model as config.json + model.safetensors (+ its sampling settings), or for diffusers.

    Every export holds a model card (README.md, with the metadata the Hugging Face hub reads) and the run's resolved recipe (training_recipe.yaml).
    """
    from diffit_toolkit.inference.export import export_model, write_folder_atomically
    from diffit_toolkit.inference.pipeline import load_pipeline
    from diffit_toolkit.interop.model_card import CardFacts, read_evaluation, write_card
    from diffit_toolkit.interop.weights import CHECKPOINT, weights_format

    if weights not in ("ema", "model"):
        raise UsageError(f"--weights must be ema or model, got '{weights}'")
    if diffusers and diffusers_pipeline:
        raise UsageError("--diffusers and --diffusers-pipeline are two formats: give one (the pipeline folder holds "
                         "the transformer folder too)")
    if vae is not None and not diffusers_pipeline:
        raise UsageError("--vae is copied into a --diffusers-pipeline folder only: add --diffusers-pipeline or drop "
                         "--vae")
    if not license_id.strip() or any(c.isspace() for c in license_id):
        raise UsageError(f"--license takes a license id without spaces (e.g. mit, apache-2.0, other), got '{license_id}'")
    check_output(out, "output folder", folder=True)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder: choose a new output folder")
    with usage_errors(ValueError):
        gen = load_pipeline(run, device="cpu", weights=weights)
    if weights_format(run) != CHECKPOINT:
        raise UsageError(f"{run} is not a run or checkpoint folder (it is already exported weights)")
    with usage_errors(ValueError):
        run_dir, recipe, step = _checkpoint_record(run)
    kind = "diffusers-pipeline" if diffusers_pipeline else "diffusers-transformer" if diffusers else "toolkit"
    card = CardFacts(kind=kind, recipe=recipe, facts=dict(gen.facts), model_config=dict(gen.model.config),
                     parameters=sum(p.numel() for p in gen.model.parameters()), step=step, weights=weights,
                     license=license_id, evaluation=read_evaluation(run_dir))
    with usage_errors(ValueError):  # a model or VAE the format cannot hold; a CheckpointError: the write failed
        if diffusers_pipeline:
            from diffit_toolkit.interop.diffusers_pipeline import (
                check_pipeline,
                pipeline_differences,
                save_dit_pipeline,
                scheduler_name,
            )

            source = check_pipeline(gen, vae)  # refused before anything is written
            card.scheduler = scheduler_name(gen.recipe.sample.sampler)
            card.differences = pipeline_differences(gen.recipe.sample, gen.facts, gen.model.out_channels, card.scheduler)

            def write(tmp: Path) -> None:
                save_dit_pipeline(gen, tmp, vae=source)
                write_card(tmp, card)

            path = write_folder_atomically(out, write)
            console.print(f"wrote {path}: diffusers DiTPipeline ({weights} weights, {card.scheduler}, VAE {source})",
                          highlight=False)
            return
        if diffusers:
            from diffit_toolkit.interop.diffusers_dit import save_diffusers_dit, to_diffusers_dit

            to_diffusers_dit(gen.model)  # refused before anything is written

            def write(tmp: Path) -> None:
                save_diffusers_dit(gen.model, tmp)
                write_card(tmp, card)

            path = write_folder_atomically(out, write)
            console.print(f"wrote {path}: diffusers DiTTransformer2DModel ({weights} weights)", highlight=False)
            return
        path = export_model(gen, out, extra=lambda tmp: write_card(tmp, card))
    cfg = gen.model.config
    vae_note = f", VAE {gen.facts['vae']}" if gen.facts.get("vae") else ""
    console.print(f"wrote {path}: {cfg['backbone']} ({weights} weights), sampler {gen.recipe.sample.sampler} "
                  f"{gen.recipe.sample.steps} steps{vae_note}", highlight=False)
