"""The ``diffit-toolkit`` command line: the typer app, the global options, and how every command
reports a failure. One module per feature area adds its commands to `app`;
`diffit_toolkit.cli` imports them all. Command modules import the model stack (torch, timm,
...) inside the command functions, so ``--help`` and the light commands start quickly.

Exit codes: 0 success, 1 a run-time failure (training diverged, a file could not be written),
2 a usage error (a bad option, recipe or path: fix the command and run it again). Commands raise
the toolkit's errors (``diffit_toolkit.errors``: each carries its exit code) and never pick a code
themselves: `CommandGroup.invoke` is the one place that turns an error into its line and its exit
code. A plain ``ValueError`` or ``OSError`` from a lower layer is a usage error only inside a block
where the command says its input caused it (`usage_errors`).

A failure is one line; ``--traceback`` (or ``DIFFIT_TOOLKIT_TRACEBACK=1``) adds the full chain of
exceptions behind it, also those a one-line message replaced (a plugin's own stack included).
"""

from __future__ import annotations

import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from diffit_toolkit.errors import RunFailure, ToolkitError, UsageError
from diffit_toolkit.registry import PLUGINS_ENV, load_plugin_modules

if TYPE_CHECKING:
    import torch


def _flags_take_no_value(params: list) -> list:
    """Show each flag (``--help``, ``--version``, ``--no-progress``) as a bare name in ``--help``;
    typer's help otherwise prints ``<bool>`` after it, as if it took a value."""
    for param in params:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class CommandGroup(typer.core.TyperGroup):
    """The class of the app and of its command groups: their ``--help`` and their commands'
    ``--help`` show flags without a value type (typer has no setting for it), and a toolkit error
    raised by a command ends it with its one line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolkitError as exc:  # the one place an error becomes an exit code
            exit_with_error(exc, exc.exit_code)

    def get_params(self, ctx):
        return _flags_take_no_value(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _flags_take_no_value([*command.params, command.get_help_option(ctx)])
        return command


app = typer.Typer(cls=CommandGroup, help="DiffiT / DiT diffusion transformers: train, sample, evaluate, extend.",
                  no_args_is_help=True)
console = Console()

#: Exit codes of every command (each toolkit error carries its own: ``exc.exit_code``).
EXIT_FAILURE, EXIT_USAGE = RunFailure.exit_code, UsageError.exit_code
#: Set to 1 for the full exception chain behind every one-line error (as ``--traceback``).
TRACEBACK_ENV = "DIFFIT_TOOLKIT_TRACEBACK"
_show_traceback = {"on": False}


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception behind it (``__cause__``, else ``__context__``, also where
    ``raise ... from None`` hid it), the first raised first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain[::-1]


def format_chain(exc: BaseException) -> str:
    """The tracebacks of [`exception_chain`][diffit_toolkit.commands.exception_chain], joined."""
    parts = ["".join(traceback.format_exception(type(e), e, e.__traceback__, chain=False)) for e in exception_chain(exc)]
    return "\nwhich led to:\n\n".join(parts)


def exit_with_error(message: object, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``error: <first line of message>`` unwrapped (one line whatever the terminal width)
    and exit with ``code``: how `CommandGroup` reports a toolkit error raised by a command."""
    text = str(message).strip()
    first = text.splitlines()[0] if text else "failed"
    if _show_traceback["on"] or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        cause = message if isinstance(message, BaseException) else sys.exc_info()[1]
        if cause is not None:
            Console(stderr=True).print(escape(format_chain(cause)), soft_wrap=True, highlight=False)
    console.print(f"[red]error:[/red] {escape(first)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


@contextmanager
def usage_errors(*types: type[Exception]) -> Iterator[None]:
    """Inside, a plain exception of ``types`` from a lower layer (``ValueError``: a bad value;
    ``OSError``: a path that cannot be read) means the command's input is wrong: it becomes a
    `UsageError` with the same message (exit 2), the original kept as its cause. The toolkit's own
    errors pass unchanged, with their own exit codes."""
    try:
        yield
    except ToolkitError:
        raise
    except types as exc:
        raise UsageError(str(exc)) from exc


def finite(value: float | None) -> float | None:
    """Typer callback for float options: ``inf`` and ``nan`` are refused (``--guidance-scale inf``
    would otherwise run to the end and write black images)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _print_version(value: bool) -> None:
    if value:
        from diffit_toolkit import __version__

        console.print(__version__, highlight=False)
        raise typer.Exit()


@app.callback()
def global_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
    plugin: list[str] = typer.Option(
        None, "-p", "--plugin", metavar="MODULE",
        help=f"Load a plugin module (dotted name or .py file) before the command runs; repeatable. "
             f"Also read from {PLUGINS_ENV} (comma-separated).",
    ),
    show_traceback: bool = typer.Option(False, "--traceback", help=f"On an error, also print the full chain of "
                                        f"exceptions behind its one line (or set {TRACEBACK_ENV}=1)."),
) -> None:
    """DiffiT / DiT diffusion transformers: train, sample, evaluate, extend."""
    _show_traceback["on"] = show_traceback
    load_plugin_modules(list(plugin or []))  # a PluginError: a usage error (exit 2)


def check_output(path: Path | None, option: str, folder: bool = False) -> None:
    """A one-line `UsageError` when an output path cannot be written (a name too long, a folder of
    it that is a file; a folder where a file is wanted, unless ``folder``): checked before any work."""
    if path is None:
        return
    try:
        if path.is_dir() and not folder:
            raise UsageError(f"{option} {path} is a folder; give a file path")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder")
    except OSError as exc:  # ENAMETOOLONG and alike, raised by stat itself
        raise UsageError(f"{option} {path}: {exc.strerror or exc}; give another path") from exc


def check_device(device: str | None) -> torch.device:
    """The device a command runs on: ``--device`` (``cpu``, ``cuda``, ``cuda:N``) or, when it is not
    given, CUDA when available. A one-line `UsageError` when it names a device this machine does not have."""
    from diffit_toolkit.runs import parse_device

    with usage_errors(ValueError):
        return parse_device(device)


#: Help of the ``--no-progress`` option of every command with a progress bar.
NO_PROGRESS_HELP = "No progress bar (it is shown only on an interactive terminal anyway)."


@contextmanager
def progress_bar(label: str, total: int | None = None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A progress bar with counts, elapsed time and ETA, shown on interactive terminals only; how
    every command shows progress. Yields ``update(done, total=None, label=None)``: ``done`` items of
    ``total`` (``None`` keeps the current total); ``label`` renames the phase (e.g. "features")."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task(label, total=total)

        def update(done: int, total: int | None = None, label: str | None = None) -> None:
            changes: dict = {"completed": done}
            if total is not None:
                changes["total"] = total
            if label is not None:
                changes["description"] = label
            bar.update(task, **changes)

        yield update


def parse_guidance_interval(text: str) -> tuple[float, float] | None:
    """``--guidance-interval`` text: ``"0.29,0.59"`` -> ``(0.29, 0.59)`` (fractions of the sampler's
    noise range); ``"none"`` -> ``None`` (guide everywhere)."""
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval takes LO,HI fractions (e.g. 0.29,0.59) or none; got '{text}'") from None
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--guidance-interval needs 0 <= LO <= HI <= 1; got '{text}'")
    return lo, hi
