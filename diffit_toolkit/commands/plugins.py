"""``diffit-toolkit plugins`` (the version is ``diffit-toolkit --version``)."""

from __future__ import annotations

import re
import warnings

import typer
from rich.markup import escape
from rich.table import Table

from diffit_toolkit.commands import app, console
from diffit_toolkit.registry import KIND_LABELS, all_registries, get_registry, plugin_failures


#: A plugin's summary is the first sentence of its docstring, written for the documentation pages;
#: the terminal gets it without markup: a cross-reference [text][target] keeps its text, double and
#: single backticks and a Sphinx role prefix (:func:) are dropped.
_MARKUP = [(re.compile(r"\[([^\[\]]+)\]\[[^\[\]]*\]"), r"\1"), (re.compile(r":[a-z]+:(?=`)"), ""),
           (re.compile(r"``(.+?)``"), r"\1"), (re.compile(r"`([^`]+)`"), r"\1")]


def plain_text(text: str) -> str:
    """``text`` without reStructuredText / markdown inline markup, for the terminal."""
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return text


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
        is_backend = registry.kind == "attention"
        headers = ["name", "source", *(["available"] if is_backend else []), "summary"]
        rows = [[entry.name, entry.source, *([_availability(entry.obj)] if is_backend else []), plain_text(entry.summary)]
                for entry in registry.entries()] or [["(none)", *[""] * (len(headers) - 1)]]
        table = Table(title=plural, title_justify="left")
        for header in headers:
            # A word longer than its column (a function name in a summary) folds onto the next line
            # instead of being cut with an ellipsis.
            table.add_column(header, style="bold" if header == "name" else "", overflow="fold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        # Every column but the summary keeps its full width where the summary still gets room for
        # its longest word; on a narrower terminal it is as wide as its own longest word, so a name
        # or the package extra of an install command stays whole.
        cells = [headers, *rows]
        full = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        longest = [max(len(word) for row in cells for word in row[i].split() or [""]) for i in range(len(headers))]
        room = console.width - 3 * len(headers) - 1  # less the borders and the padding
        widths = full if sum(full[:-1]) + longest[-1] <= room else longest
        for column, width in zip(table.columns[:-1], widths):
            column.width = width
        console.print(table)
    for failure in failures:
        console.print(f"[red]error:[/red] {escape(failure.message())}", soft_wrap=True, highlight=False)
