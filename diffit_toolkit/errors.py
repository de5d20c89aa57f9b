"""How every layer words a problem: one line, with the closest valid name when there is one."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

#: How alike a typo and a valid name must be for "did you mean" (``difflib`` ratio).
SUGGESTION_CUTOFF = 0.6


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
