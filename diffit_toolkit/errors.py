"""How every layer words a problem: one line, with the closest valid name when there is one; and
the exit code it ends a command with.

Every error of the toolkit is a [`ToolkitError`][diffit_toolkit.errors.ToolkitError] that carries
its `exit_code`; the command line turns it into its one line and that code in one place (the
command group in `diffit_toolkit.commands`). The rule: a
[`UsageError`][diffit_toolkit.errors.UsageError] (exit 2) lies in what the user gave (an option, a
recipe, a plugin or its name, a path, data or weights they named, an extra to install) and is fixed
there before the same command runs again; a [`RunFailure`][diffit_toolkit.errors.RunFailure]
(exit 1) is met while the work runs from valid input (training diverged, a run's checkpoint
damaged or not writable, a run folder in use, a sweep stopped or a job failed). Where one kind of
failure can also be the user's path (a checkpoint path that is none), a usage subclass of it says so.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

#: How alike a typo and a valid name must be for "did you mean" (``difflib`` ratio).
SUGGESTION_CUTOFF = 0.6


class ToolkitError(Exception):
    """Base class of the toolkit's one-line errors; ``exit_code`` is the command's exit status."""

    exit_code: ClassVar[int] = 1


class UsageError(ToolkitError):
    """Bad input: an option, a recipe, a plugin or its name, a path or data the user named, a
    missing optional dependency. Fix the command (or what it names) and run it again (exit 2)."""

    exit_code: ClassVar[int] = 2


class RunFailure(ToolkitError):
    """A failure while running from valid input: training diverged, a checkpoint or run folder that
    cannot be read, written or used, a sweep stopped or a job failed (exit 1)."""

    exit_code: ClassVar[int] = 1


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``"; did you mean 'tmsa'?"`` for the closest of ``choices``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=SUGGESTION_CUTOFF)
    return f"; did you mean '{close[0]}'?" if close else ""


def one_line(exc: BaseException) -> str:
    """``"TypeError: first line of the message"`` (the type alone for an empty message)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_json_object(path: Path, what: str, hint: str = "") -> dict:
    """The JSON object in ``path``; one ``ValueError`` line when it is not JSON or not an object
    (``what`` names what it should hold, ``hint`` what to do about it)."""
    import json

    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"'{path}' is not valid JSON ({exc}){hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' holds a {type(data).__name__}, not {what}{hint}")
    return data
