"""``diffit-toolkit train`` and ``diffit-toolkit recipe show|validate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.syntax import Syntax

from diffit_toolkit.commands import CommandGroup, app
from diffit_toolkit.errors import RunFailure
from diffit_toolkit.recipe import read_recipe

console = Console()
recipe_app = typer.Typer(cls=CommandGroup, help="Inspect recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

SET_HELP = "Override a recipe value, e.g. --set train.lr=3e-4 (repeatable; values are YAML)."


def _load(recipe: str, overrides: list[str] | None, read_data: bool = False, build: bool = True):
    """The recipe, checked as training will build it (with the data's facts when ``read_data``;
    types only without ``build``), and the sentences naming the checks that had to be skipped."""
    resolved = read_recipe(recipe, overrides or [])
    if not build:
        return resolved, []
    from diffit_toolkit.build import check_recipe  # the model stack: only when building

    return resolved, check_recipe(resolved, read_data=read_data)


@recipe_app.command("show")
def recipe_show(recipe: str = typer.Argument(..., help="Recipe file or shipped recipe name."),
                set_: list[str] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Print the resolved recipe (extends and overrides applied, defaults filled in, types checked; 'diffit-toolkit recipe validate' checks it as training builds it)."""
    console.print(Syntax(_load(recipe, set_, build=False)[0].to_yaml(), "yaml"))


@recipe_app.command("validate")
def recipe_validate(recipes: list[str] = typer.Argument(..., help="Recipe files or names."),
                    set_: list[str] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Check recipes as training builds them (types, unknown keys, the process and sampler, the data, and the model shaped by the data when the data can be read); exit 2 on the first error."""
    for recipe in recipes:
        resolved, skipped = _load(recipe, set_, read_data=True)
        console.print(f"[green]ok[/green] {recipe}: {resolved.name} "
                      f"({resolved.model.get('backbone')}, {resolved.model.get('mechanism', 'default mechanism')})", highlight=False)
        for sentence in skipped:
            console.print(f"  not checked: {sentence}", highlight=False, soft_wrap=True)


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe file (e.g. recipes/quickstart.yaml) or shipped recipe name."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    resume: Path = typer.Option(None, help="Checkpoint folder to resume from (default: the run folder's newest)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    output_dir: str = typer.Option(None, help="Run folder (default: the recipe's output_dir or runs/<name>)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Log lines instead of a progress bar."),
    init_from: Path = typer.Option(None, "--init-from", help="Start from these weights (run, step or exported folder, "
                                   "or a weights file) with a new optimizer: fine-tuning. Ignored when resuming."),
) -> None:
    """Train a recipe. Runs unchanged under torchrun and SLURM; resumes from the run folder."""
    from diffit_toolkit.errors import ToolkitError
    from diffit_toolkit.train import train as run

    from diffit_toolkit.commands import check_device

    check_device(device)
    overrides = list(set_ or [])
    if output_dir:
        overrides.append(f"output_dir={output_dir}")
    resolved, _ = _load(recipe, overrides)
    try:
        result = run(resolved, resume=resume, device=device, progress=not no_progress, init_from=init_from)
    except ToolkitError:  # its own exit code (MissingWeightsError is an OSError too)
        raise
    except OSError as exc:  # a write outside the checkpoints (metrics, grids) on a full disk, say
        where = f" {exc.filename}" if exc.filename else ""
        raise RunFailure(f"could not write{where} ({exc.strerror or exc}); the checkpoints are intact: free space "
                         f"and run the same command to resume") from exc
    if result.stopped_by:
        console.print(f"stopped by {result.stopped_by} at step {result.step}; checkpoint {result.checkpoint}; "
                      f"run the same command to resume", highlight=False)
    elif result.grid is not None and result.steps_run == 0:
        console.print(f"already finished at step {result.step} (train.max_steps); nothing to train: raise "
                      f"train.max_steps to go on, or give another --output-dir for a new run; grid {result.grid}",
                      highlight=False)
    elif result.grid is not None:
        console.print(f"done: {result.step} steps ({result.steps_run} in this run) in {result.seconds / 60:.1f} min; "
                      f"grid {result.grid}", highlight=False)
