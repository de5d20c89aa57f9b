"""Sub-commands of the ``diffit-toolkit`` CLI, one module per feature area.

Each module adds its commands to :data:`diffit_toolkit.cli.app` when imported by ``cli.py``.
"""
