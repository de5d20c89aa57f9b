"""The ``diffit-toolkit`` command line: the typer app with every command module's commands.

Run as the ``diffit-toolkit`` console script, ``python -m diffit_toolkit`` or, under torchrun,
``python -m diffit_toolkit.cli``. A toolkit error raised by any command ends it with one line and
the exit code the error carries (2: usage, 1: failure; ``diffit_toolkit.errors``), mapped in one
place: the app's command group (``diffit_toolkit.commands.CommandGroup``).
"""

from __future__ import annotations

from diffit_toolkit.commands import app, bench, benchmark, data, eval, export, models, plugins, sample, train  # noqa: F401  (register commands)

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m diffit_toolkit.cli` (e.g. under torchrun)
    main()
