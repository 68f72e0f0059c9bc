"""A small helper for config dataclass fields: a default, one line of help, optional choices."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence


def opt(default: Any, help: str, choices: Sequence[Any] | None = None, minimum: float | None = None,
        resumable: bool = False, normalise: Callable[[Any], Any] | None = None,
        hash_default: bool = True) -> Any:
    """A dataclass field with ``help`` (shown by ``samft info``/docs) and optional validation.

    ``choices``: the values accepted (registry names come from :mod:`samft.config.names`). ``resumable``:
    ``--resume`` may change the option (how long and how the run goes on, not what it learns; see
    :data:`samft.config.RESUMABLE_KEYS`). ``normalise``: applied to a loaded value before it is coerced to the
    field's type (``peft.blocks`` takes a YAML list and keeps it as a string). ``hash_default=False``: at its
    default the option is left out of the written config and its hash (an option added later, so that the hash of
    every config written before it stays the same). Mutable defaults (lists, dicts) are copied per instance.
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if minimum is not None:
        meta["minimum"] = minimum
    if resumable:
        meta["resumable"] = True
    if normalise is not None:
        meta["normalise"] = normalise
    if not hash_default:
        meta["hash_default"] = False
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section (another dataclass) with its help line."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})
