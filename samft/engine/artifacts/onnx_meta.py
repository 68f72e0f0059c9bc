"""An ONNX export's file: the graph with samft's metadata (``samft.*`` properties: kind, format, input
size, task, threshold, class names, normalisation ...). :mod:`samft.deploy_onnx` reads the same
properties at deployment time without samft's engine (numpy + onnxruntime only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samft.engine.artifacts.fileio import atomic_write_bytes, fail, field, int_text, parse_json

KIND = "onnx_model"
FORMAT = "samft-onnx-1"
META_PREFIX = "samft."
JSON_KEYS = ("classes", "pixel_mean", "pixel_std")


def with_metadata(data: bytes, meta: dict[str, object]) -> bytes:
    """The ONNX model ``data`` with ``meta`` (plus kind and format) as ``samft.*`` properties."""
    import onnx

    model = onnx.load_from_string(data)
    for key, value in {"kind": KIND, "format": FORMAT, **meta}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value if isinstance(value, str) else json.dumps(value)
    return model.SerializeToString()


def write(path: str | Path, data: bytes, meta: dict[str, object]) -> int:
    """Write the graph ``data`` with ``meta`` atomically; returns the bytes written."""
    data = with_metadata(data, meta)
    atomic_write_bytes(path, data)
    return len(data)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a graph that already carries its metadata (:func:`with_metadata`) atomically."""
    atomic_write_bytes(path, data)


def read(path: str | Path) -> dict[str, Any]:
    """The ``samft.*`` metadata of an ONNX export, checked (JSON fields parsed, numbers as numbers)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        fail(path, "ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable ONNX file"
        fail(path, f"not a readable ONNX file ({type(e).__name__})")
    return check({p.key: p.value for p in model.metadata_props}, path)


def _float_text(meta: dict, key: str, path: str | Path, lo: float, hi: float) -> float:
    text = field(meta, key, str, path)
    try:
        value = float(text)
    except ValueError:
        fail(path, f"field {key!r} is {text[:40]!r}, expected a number")
    if not lo <= value <= hi:  # NaN fails too
        fail(path, f"field {key!r} is {text[:40]!r}, expected {lo:g} to {hi:g}")
    return value


def check(props: dict[str, str], path: str | Path) -> dict[str, Any]:
    """An ONNX file's metadata properties (all of them, ``samft.*`` and others) -> samft's fields, checked:
    ``img_size`` and ``task`` required, ``threshold`` a probability, the JSON fields lists, a multi-class
    export's ``classes`` two or more names. Fields are named without the ``samft.`` prefix."""
    meta = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
    if not meta:
        fail(path, "an ONNX file without samft's metadata (no samft.* properties): not written by samft export --onnx")
    if meta.get("kind", KIND) != KIND:
        fail(path, f"field 'kind' is {meta['kind'][:40]!r}, expected {KIND!r}")
    out: dict[str, Any] = dict(meta)
    out["img_size"] = int_text(meta, "img_size", path, 16, 1 << 15)
    if field(meta, "task", str, path) not in ("binary", "multiclass"):
        fail(path, f"field 'task' is {meta['task'][:40]!r}, expected binary or multiclass")
    out["threshold"] = _float_text(meta, "threshold", path, 0.0, 1.0) if "threshold" in meta else 0.5
    for key in JSON_KEYS:
        if key in meta:
            out[key] = parse_json(meta[key], path, f"field {key!r}")
            if not isinstance(out[key], list):
                fail(path, f"field {key!r} is a {type(out[key]).__name__}, expected a list")
    classes = out.get("classes", [])
    if not all(isinstance(c, str) for c in classes):
        fail(path, "field 'classes' holds something else than names (strings)")
    if (out["task"] == "multiclass") != bool(classes) or len(classes) == 1:
        fail(path, f"field 'classes' lists {len(classes)} name(s) for a {out['task']} export (expected none for "
                   f"binary, two or more for multiclass)")
    return out
