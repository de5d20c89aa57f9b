"""``diffit-toolkit plugins`` (the version is ``diffit-toolkit --version``)."""

from __future__ import annotations

import warnings

import typer
from rich.markup import escape
from rich.table import Table

from diffit_toolkit.commands import app, console
from diffit_toolkit.registry import KIND_LABELS, all_registries, get_registry, plugin_failures


def _availability(obj: object) -> str:
    reason = obj.unavailable_reason() if hasattr(obj, "unavailable_reason") else None
    return "yes" if reason is None else f"no: {reason}"


@app.command()
def plugins(kind: str = typer.Option(None, help=f"Only this kind ({', '.join(KIND_LABELS)}).")) -> None:
    """List registered plugins of every kind with the package each came from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failures are listed below instead
        failures = plugin_failures()
    registries = [get_registry(kind)] if kind else all_registries()
    for registry in registries:
        plural = registry.label + ("es" if registry.label.endswith("s") else "s")  # diffusion processes
        table = Table(title=plural, title_justify="left")
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
