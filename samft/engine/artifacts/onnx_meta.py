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
    meta = {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    if meta.get("kind", KIND) != KIND:
        fail(path, f"field 'kind' is {meta['kind'][:40]!r}, expected {KIND!r}")
    out: dict[str, Any] = dict(meta)
    out["img_size"] = int_text(meta, "img_size", path, 16, 1 << 15)
    if field(meta, "task", str, path) not in ("binary", "multiclass"):
        fail(path, f"field 'task' is {meta['task'][:40]!r}, expected binary or multiclass")
    for key in JSON_KEYS:
        if key in meta:
            out[key] = parse_json(meta[key], path, f"field {key!r}")
            if not isinstance(out[key], list):
                fail(path, f"field {key!r} is a {type(out[key]).__name__}, expected a list")
    return out
