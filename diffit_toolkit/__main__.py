"""``python -m diffit_toolkit``: the command line."""

from diffit_toolkit.cli import main

main()
