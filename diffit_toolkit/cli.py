"""The ``diffit-toolkit`` command line (typer)."""

from __future__ import annotations

import importlib
import math
import warnings
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from diffit_toolkit import __version__
from diffit_toolkit.registry import all_registries, get_registry, plugin_failures

app = typer.Typer(help="DiffiT / DiT diffusion transformers: train, sample, evaluate, extend.", no_args_is_help=True)
console = Console()


def exit_with_error(message: object, code: int = 1) -> NoReturn:
    """Print ``error: <first line of message>`` unwrapped (one line whatever the terminal width)
    and exit with ``code``: how every command reports a failure."""
    text = str(message).strip()
    first = text.splitlines()[0] if text else "failed"
    console.print(f"[red]error:[/red] {escape(first)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def finite(value: float | None) -> float | None:
    """Typer callback for float options: ``inf`` and ``nan`` are refused (``--guidance-scale inf``
    would otherwise run to the end and write black images)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _availability(obj: object) -> str:
    reason = obj.unavailable_reason() if hasattr(obj, "unavailable_reason") else None
    return "yes" if reason is None else f"no: {reason}"


@app.command()
def plugins(kind: str = typer.Option(None, help="Only this kind (conditioning, attention, backbone, time_embedding).")) -> None:
    """List registered plugins of every kind with the package each came from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failures are listed below instead
        failures = plugin_failures()
    registries = [get_registry(kind)] if kind else all_registries()
    for registry in registries:
        table = Table(title=f"{registry.label}s", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("source")
        is_backend = registry.kind == "attention"
        if is_backend:
            table.add_column("available")
        table.add_column("summary")
        for entry in registry.entries():
            row = [entry.name, entry.source]
            if is_backend:
                row.append(_availability(entry.obj))
            table.add_row(*(escape(cell) for cell in row), escape(entry.summary))
        if not registry.entries():
            table.add_row("(none)", "", *([""] if is_backend else []), "")
        console.print(table)
    for failure in failures:
        console.print(f"[red]error:[/red] {escape(failure.message())}", soft_wrap=True, highlight=False)


@app.command()
def version() -> None:
    """Print the toolkit version."""
    console.print(__version__)


def main() -> None:
    """Console-script entry point."""
    app()


# Feature areas add their commands to ``app`` when imported; this stays at the bottom of the
# module because each of them imports ``app`` from here.
_COMMAND_MODULES: tuple[str, ...] = ("models", "data", "train", "sample", "eval", "bench")
for _module in _COMMAND_MODULES:
    importlib.import_module(f"diffit_toolkit.commands.{_module}")


if __name__ == "__main__":  # pragma: no cover - `python -m diffit_toolkit.cli` (e.g. under torchrun)
    # Run the imported module's app: the command modules register on it, not on this __main__ copy.
    from diffit_toolkit.cli import main as _main

    _main()
