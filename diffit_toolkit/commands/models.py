"""``diffit-toolkit model-info`` and ``diffit-toolkit convert``: model facts and checkpoint import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml
from rich.table import Table

from diffit_toolkit.commands import app, console, usage_errors
from diffit_toolkit.errors import RunFailure, UsageError


def _listed() -> dict[str, tuple[str, list[str]]]:
    """Every registered backbone (a plugin's too) with the presets its factory declares
    (``factory.presets``) and the model-name prefix shown (``factory.model_name``, else its name)."""
    from diffit_toolkit.registry import backbones

    return {entry.name: (getattr(entry.obj, "model_name", entry.name), list(getattr(entry.obj, "presets", ())))
            for entry in backbones.entries()}


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as YAML scalars/lists (``window=8``, ``channels=[64,128]``)."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got '{item}'")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError) as exc:  # a tag (!!python/...), broken or too deep YAML
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
            raise typer.BadParameter(f"--set {key.strip()}: the value is not plain YAML ({reason})") from None
    from diffit_toolkit.recipe import RecipeError, check_model_options

    try:  # the recipe's bounds, before anything is built (depth=100000000 would fill the memory)
        check_model_options(options, "--set")
    except RecipeError as exc:
        raise typer.BadParameter(str(exc)) from None
    return options


@app.command("model-info")
def model_info(
    backbone: list[str] = typer.Option(None, "--backbone", "-b", help="Backbone(s): latent_diffit, dit, image_diffit (default: all)."),
    preset: list[str] = typer.Option(None, "--preset", "-p", help="Preset(s), e.g. XL/2 or cifar10, or none for the backbone's defaults with --set (default: all of each backbone)."),
    mechanism: str = typer.Option(None, "--mechanism", "-m", help="Conditioning mechanism for every model listed."),
    input_size: int = typer.Option(None, "--input-size", help="Input side (latent side for latent models: 32 = 256 px, 64 = 512 px)."),
    num_classes: int = typer.Option(None, "--num-classes", help="Class labels (latent default 1000; 0 = unconditional)."),
    sets: list[str] = typer.Option(None, "--set", help="Any backbone option as key=value (repeatable)."),
) -> None:
    """Print parameters, MACs and FLOPs (one forward pass, batch 1) per preset."""
    from diffit_toolkit.backbones.info import model_facts

    listed = _listed()
    options = _parse_sets(sets)
    for key, value in (("mechanism", mechanism), ("input_size", input_size), ("num_classes", num_classes)):
        if value is not None:
            options[key] = value
    chosen = backbone or [name for name, (_, presets) in listed.items() if presets]
    from diffit_toolkit.registry import backbones

    for name in chosen:
        backbones.get(name)  # an unknown name: a PluginError (exit 2)
    table = Table(caption="batch 1; MACs are what DiT calls 'Gflops'; FLOPs = 2 x MACs", caption_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("mechanism", no_wrap=True)
    for column in ("params (M)", "GMACs", "GFLOPs"):
        table.add_column(column, justify="right", no_wrap=True)
    for name in chosen:
        prefix, presets = listed.get(name, (name, []))
        for p in preset or presets:
            defaults = p.lower() == "none"  # the backbone's defaults and the --set options, no preset
            if preset and presets and p not in presets and not defaults:
                continue  # a preset of another backbone
            with usage_errors(ValueError):
                facts = model_facts(name, None if defaults else p, **options)
            table.add_row(
                f"{prefix} (no preset)" if defaults else f"{prefix}-{p}", facts.mechanism or "",
                f"{facts.params / 1e6:.2f}", f"{facts.gmacs:.2f}", f"{facts.gflops:.2f}"
            )
    if not table.rows:
        valid = sorted({p for name in chosen for p in listed.get(name, ("", []))[1]})
        raise UsageError(f"unknown preset(s) {', '.join(preset)} for backbone(s) {', '.join(chosen)} (valid: {', '.join(valid)})")
    console.print(table)


@app.command()
def convert(
    source: Path = typer.Argument(..., help="Released checkpoint (.pt/.pth read with weights_only=True, or .safetensors)."),
    output: Path = typer.Argument(..., help="Toolkit checkpoint to write (.safetensors, config in its header)."),
    layout: str = typer.Option("auto", "--layout", help="auto, diffit (released latent DiffiT) or dit (DiT reference)."),
    num_heads: int = typer.Option(None, "--num-heads", help="Heads, for a DiT whose width matches no preset."),
    sets: list[str] = typer.Option(None, "--set", help="Other backbone options as key=value (e.g. attention_backend=sdpa)."),
    no_null_class: bool = typer.Option(False, "--no-null-class", help="The label table has no null-class row (trained "
                                       "with class dropout 0): every row is a class; guidance is refused."),
) -> None:
    """Convert a released DiffiT, DiT or diffusers DiT checkpoint (file or diffusers folder) into a toolkit checkpoint."""
    from diffit_toolkit.backbones.info import count_parameters
    from diffit_toolkit.runs.model_file import save_model_file
    from diffit_toolkit.interop.released import load_released

    options = _parse_sets(sets)
    if num_heads is not None:
        options["num_heads"] = num_heads
    if output.is_dir():
        raise UsageError(f"output {output} is a folder; give a file path ending in .safetensors")
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise UsageError(f"output {output} is the source itself; write the converted model to another file")
    with usage_errors(ValueError, FileNotFoundError):
        model = load_released(source, layout=layout, null_class=not no_null_class, **options)
    try:
        path = save_model_file(model, output, metadata={"diffit_toolkit.converted_from": source.name})
    except OSError as exc:  # a full disk, a read-only folder: a failure, as every command's writes
        raise RunFailure(f"could not write {output} ({exc.strerror or exc})") from exc
    cfg = model.config
    console.print(
        f"wrote {path}: {cfg['backbone']} ({cfg['mechanism']}), depth {cfg['depth']}, width {cfg['hidden_size']}, "
        f"patch {cfg['patch_size']}, input {cfg['input_size']}, {cfg['num_classes']} classes, "
        f"{count_parameters(model) / 1e6:.2f} M parameters"
    )
