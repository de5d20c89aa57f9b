"""The ``diffit-toolkit`` command line: the typer app with every command module's commands.

Run as the ``diffit-toolkit`` console script, ``python -m diffit_toolkit`` or, under torchrun,
``python -m diffit_toolkit.cli``.
"""

from __future__ import annotations

from diffit_toolkit.commands import app, bench, benchmark, data, eval, export, models, plugins, sample, train  # noqa: F401  (register commands)

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover - `python -m diffit_toolkit.cli` (e.g. under torchrun)
    main()
