"""The generic checks every field gets: its choices (with the nearest one as a hint), its minimum, and
finite floats. The rules that tie fields together live beside their section (each section's ``check``)."""

from __future__ import annotations

import difflib
import math
from dataclasses import Field, fields, is_dataclass
from typing import Any

from samft.errors import ConfigError


def check_choice(value: Any, choices: tuple, key: str) -> None:
    """``value`` is one of ``choices``, else a ConfigError listing them with the nearest as a hint."""
    if value not in choices:
        same_letters = [str(c) for c in choices if str(c).casefold() == str(value).casefold()]
        near = same_letters or difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")


def require_finite(value: Any, key: str) -> None:
    """Every float of the config (in lists and mappings too) is a finite number: NaN and inf are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            require_finite(v, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            require_finite(v, f"{key}.{k}")


def _check_field(f: Field, value: Any, dotted: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None:
        check_choice(value, choices, dotted)
    require_finite(value, dotted)
    minimum = f.metadata.get("minimum")
    if minimum is not None and value is not None and value < minimum:
        raise ConfigError(f"{dotted}: {value!r} is below the minimum {minimum}")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every field of ``obj`` and of its nested sections: choices, finiteness, minimum (in field order)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(value):
            check_fields(value, dotted)
        else:
            _check_field(f, value, dotted)
