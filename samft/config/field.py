"""A small helper for config dataclass fields: a default, one line of help, optional choices."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence, Union


def opt(default: Any, help: str, choices: Union[Sequence[Any], Callable[[], Sequence[Any]], None] = None,
        minimum: float | None = None) -> Any:
    """A dataclass field with ``help`` (shown by ``samft info``/docs) and optional validation.

    ``choices`` may be a function returning them (a registry looked up when the config is validated,
    so that importing the config imports no registry). Mutable defaults (lists, dicts) are copied per
    instance.
    """
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices if callable(choices) else tuple(choices)
    if minimum is not None:
        meta["minimum"] = minimum
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section (another dataclass) with its help line."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})
