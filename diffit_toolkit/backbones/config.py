"""Helpers shared by the backbone configs: presets with overrides, one-line errors, JSON-safe dicts."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from diffit_toolkit.errors import did_you_mean

C = TypeVar("C")


def unknown_name_error(what: str, name: str, valid: list[str]) -> ValueError:
    """``unknown <what> 'x'; did you mean 'y'? (valid: ...)`` as a one-line ValueError."""
    return ValueError(f"unknown {what} '{name}'{did_you_mean(name, valid)} (valid: {', '.join(valid)})")


def config_from_options(cls: type[C], base: Mapping[str, Any], options: Mapping[str, Any], what: str) -> C:
    """Build the config dataclass ``cls`` from preset fields ``base`` overridden by ``options``.

    An option that is not a field is a one-line error listing the valid ones (never dropped).
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in fields]
    if unknown:
        hint = did_you_mean(unknown[0], fields)
        raise ValueError(f"unknown {what} option(s) {', '.join(map(repr, unknown))}{hint} (valid: {', '.join(fields)})")
    return cls(**{**base, **options})


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-ready dict (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def check_positive(owner: str, **values: int | float) -> None:
    """One-line error for the first non-positive value."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}: {name} must be positive, got {value}")
