"""What every file-kind module of :mod:`samft.engine.artifacts` shares: bounded JSON parsing, field
checks that fail in one line naming the file and the field, safetensors reading, atomic ``torch.save``.

Each file kind (``adapter``, ``state``, ``run_config``, ``eval_json``, ``split_file``, ``metrics_csv``,
``exports``, ``onnx_meta``) has one module with one ``read`` and one ``write``; they use these helpers,
and nothing else in the engine opens those files (see :mod:`samft.engine.artifacts.kinds`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from samft.errors import CheckpointError
from samft.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)
from samft.files import MAX_JSON_DEPTH
from samft.files import parse_json as _parse_json

MAX_DEPTH = MAX_JSON_DEPTH
MAX_NUMBER = 1e15  # counts, sizes and steps beyond this are damage, not data
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "a mapping",
               list: "a list", type(None): "null"}


def fail(path: str | Path, message: str, cls: type = CheckpointError) -> None:
    """Raise the one-line error ``PATH: message``."""
    raise cls(f"{path}: {message}")


def parse_json(text: str | bytes, path: str | Path, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` of a file's text, refusing damage and nesting deeper than ``max_depth`` (one line)."""
    return _parse_json(text, path, what, CheckpointError, max_depth)


def read_json_file(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        fail(path, f"{what} not found")
    try:
        return parse_json(path.read_bytes(), path, what)
    except OSError as e:
        fail(path, f"cannot read the {what} ({e.strerror or e})")


def _type_name(types: tuple) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def field(data: Any, key: str, types: type | tuple, path: str | Path, where: str = "",
          default: Any = ..., lo: Optional[float] = None, hi: Optional[float] = None) -> Any:
    """``data[key]`` checked to be of ``types`` (bool is not an int) and, for numbers, within [lo, hi];
    ``default`` when given is returned for a missing key."""
    name = f"{where}.{key}" if where else key
    if not isinstance(data, dict):
        fail(path, f"{where or 'the file'} is {_TYPE_NAMES.get(type(data), type(data).__name__)}, expected a mapping")
    if key not in data:
        if default is not ...:
            return default
        fail(path, f"field {name!r} is missing")
    value, types = data[key], types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        fail(path, f"field {name!r} is {_TYPE_NAMES.get(type(value), type(value).__name__)}, expected "
                   f"{_type_name(types)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_number(value, path, name, lo, hi)
    return value


def check_number(value: float, path: str | Path, name: str, lo: Optional[float] = None,
                 hi: Optional[float] = None) -> float:
    lo = -MAX_NUMBER if lo is None else lo
    hi = MAX_NUMBER if hi is None else hi
    if isinstance(value, float) and math.isnan(value):
        return value  # a metric may be NaN (an empty set); ranges are about absurd magnitudes
    if not lo <= value <= hi:
        fail(path, f"field {name!r} is {value!r}, expected {lo:g} to {hi:g}")
    return value


def int_text(meta: dict, key: str, path: str | Path, lo: int = 0, hi: int = int(MAX_NUMBER)) -> int:
    """A metadata string field holding an integer (safetensors metadata values are strings)."""
    text = field(meta, key, str, path)
    try:
        value = int(text)
    except ValueError:
        fail(path, f"field {key!r} is {text[:40]!r}, expected an integer")
    return int(check_number(value, path, key, lo, hi))


def read_safetensors(path: str | Path, what: str = "adapter") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file (a CheckpointError naming it when unreadable)."""
    path = Path(path)
    if not path.is_file():
        fail(path, f"{what} file not found")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = parse_json(data[8 : 8 + header_len], path, f"the {what}'s header")
        metadata = header.get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    return tensors, metadata


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
