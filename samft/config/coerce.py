"""Generic coercion of loaded YAML values (and ``key=value`` overrides) to a config dataclass's field types.

:func:`from_dict` builds a dataclass from a mapping, rejecting unknown keys with the nearest valid name;
:func:`coerce` turns one value into a type (``int``, ``float``, ``bool``, ``str``, ``Optional``, ``list``,
``dict``, ``Any`` (a YAML value kept as read: scalars, lists and mappings of them, for options passed on to
another library, which checks them) or a nested dataclass). A value that cannot be coerced is a ConfigError naming the dotted key,
the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Union

from samft.errors import ConfigError

_NULL_WORDS = ("null", "none", "~")
_BOOL_TRUE = ("true", "yes", "on", "1")
_BOOL_FALSE = ("false", "no", "off", "0")


def type_name(tp: Any) -> str:
    """How an expected type reads in an error: ``float or null``, ``list of int``, ``mapping``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{type_name(args[0])} or null"
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {type_name(typing.get_args(tp)[1])}"
    if is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "value"
    return getattr(tp, "__name__", str(tp))


class _Bad(Exception):
    """Raised by a coercer when the value does not fit; :func:`coerce` turns it into the ConfigError."""


def _optional(value: Any, tp: Any, key: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in _NULL_WORDS):
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return coerce(value, args[0], key)


def _dataclass(value: Any, tp: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise _Bad
    return from_dict(tp, value, key)


def _list(value: Any, tp: Any, key: str) -> list:
    (item,) = typing.get_args(tp)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and item is str:
        value = [value]  # one path or name where a list is expected: data.unlabelled=frames/
    if not isinstance(value, list):
        raise _Bad
    return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def _dict(value: Any, tp: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad
    _, item = typing.get_args(tp)
    return {str(k): coerce(v, item, f"{key}.{k}") for k, v in value.items()}


def _bool(value: Any, tp: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _BOOL_TRUE + _BOOL_FALSE:
        return value.lower() in _BOOL_TRUE
    raise _Bad


def _number(value: Any, tp: type) -> Any:
    """``int`` or ``float`` from a number or its text; booleans are not numbers here."""
    if isinstance(value, bool):
        raise _Bad
    if tp is int and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _Bad
    if isinstance(value, (int, float, str)):
        try:
            return tp(value)
        except ValueError:
            raise _Bad from None
    raise _Bad


def _int(value: Any, tp: Any, key: str) -> int:
    return _number(value, int)


def _float(value: Any, tp: Any, key: str) -> float:
    return _number(value, float)


def _str(value: Any, tp: Any, key: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise _Bad


def _any(value: Any, tp: Any, key: str) -> Any:
    """A YAML value as read (``None``, bool, number, string, lists and mappings of them); nothing else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_any(v, tp, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _any(v, tp, key) for k, v in value.items()}
    raise _Bad


Coercer = Callable[[Any, Any, str], Any]
_BY_ORIGIN: dict[Any, Coercer] = {Union: _optional, types.UnionType: _optional, list: _list, dict: _dict}
_BY_TYPE: dict[Any, Coercer] = {bool: _bool, int: _int, float: _float, str: _str, Any: _any}


def _coercer(tp: Any) -> Coercer | None:
    if is_dataclass(tp):
        return _dataclass
    origin = typing.get_origin(tp)
    return _BY_ORIGIN.get(origin) if origin is not None else _BY_TYPE.get(tp)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``; a ConfigError naming ``key``, the value and the type when it is not one."""
    fn = _coercer(tp)
    if fn is None:
        raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in a config dataclass
    try:
        return fn(value, tp, key)
    except _Bad:
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})") from None


_BOOL_WORDS = {False: ("off", "no", "false"), True: ("on", "yes", "true")}


def yaml_bool_word(value: Any, field: dataclasses.Field) -> Any:
    """YAML 1.1 reads ``off``/``on``/``no``/``yes`` as booleans: give a choice field its word back."""
    choices = field.metadata.get("choices")
    if isinstance(value, bool) and choices is not None:
        for word in _BOOL_WORDS[value]:
            if word in choices:
                return word
    return value


def unknown_key(dotted: str, key: str, prefix: str, names: list[str]) -> ConfigError:
    """The error for a key the section does not have, with the nearest valid name (a typo hint)."""
    near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{near[0]}'?)" if near else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}; valid keys here: {', '.join(names)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from a mapping of (a subset of) its fields, each value coerced."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in by_name:
            raise unknown_key(dotted, key, prefix, list(by_name))
        normalise = by_name[key].metadata.get("normalise")
        if normalise is not None:
            value = normalise(value)
        kwargs[key] = coerce(yaml_bool_word(value, by_name[key]), hints[key], dotted)
    return cls(**kwargs)
