"""The resumable state (``state.safetensors``): everything ``--resume`` needs (trainable tensors,
optimizer, scheduler, step, RNG) in ONE file written atomically: every tensor (and numpy array) as a
safetensors tensor, everything else as JSON in the file's metadata, with references to the tensors.
Reading it never unpickles anything, so a run directory from elsewhere cannot execute code. A
``state.pt`` of samft <= 0.1 (``torch.save``) is read with ``torch.load(weights_only=True)`` and an
allow-list of numpy's array reconstruction only (for numpy's RNG state); anything else in it is refused.
"""

from __future__ import annotations

import io
import json
import math
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from samft.version import __version__
from samft.engine.artifacts.fileio import MAX_DEPTH, atomic_write_bytes, field, parse_json, read_safetensors
from samft.errors import CheckpointError, load_failure

KIND = "state"
STATE_FORMAT = "samft-state-1"
FORMAT = STATE_FORMAT
RESUME_KEYS = ("trainable", "optimizer", "scheduler", "progress")  # what --resume needs
STATE_DEPTH = 2 * MAX_DEPTH + 2  # every object is a one-key tag: twice the nesting of the state itself


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The resumable state: tensors in safetensors, the rest as tagged JSON in the same file's metadata
# ---------------------------------------------------------------------------------------------


class _Encoder:
    """Turns a nested structure into JSON (every object is a one-key tag) plus a flat tensor dict.

    Tags: ``{"dict": [[key, value], ...]}`` (keys of any encodable type, order kept), ``{"tuple": [...]}``,
    ``{"tensor": name}``, ``{"ndarray": [name, dtype, shape]}`` (raw bytes as a uint8 tensor),
    ``{"float": "nan" | "inf" | "-inf"}``; lists, str, int, finite float, bool and None are plain JSON.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _name(self, path: str) -> str:
        name, n = path or "root", 1
        while name in self.tensors:
            n += 1
            name = f"{path}#{n}"
        return name

    def encode(self, obj: Any, path: str = "") -> Any:
        if isinstance(obj, torch.Tensor):
            name = self._name(path)
            self.tensors[name] = obj.detach().to("cpu").contiguous().clone()
            return {"tensor": name}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise TypeError(f"{path}: numpy arrays of Python objects are not stored")
            name = self._name(path)
            raw = np.frombuffer(np.ascontiguousarray(obj).tobytes(), np.uint8).copy()
            self.tensors[name] = torch.from_numpy(raw)
            return {"ndarray": [name, obj.dtype.str, list(obj.shape)]}
        if isinstance(obj, dict):
            return {"dict": [[self.encode(k, f"{path}/key"), self.encode(v, f"{path}/{k}".lstrip("/"))]
                             for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [self.encode(v, f"{path}/{i}".lstrip("/")) for i, v in enumerate(obj)]
            return {"tuple": items} if isinstance(obj, tuple) else items
        if isinstance(obj, float) and not math.isfinite(obj):
            return {"float": repr(obj)}
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return self.encode(obj.item(), path)
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored in the resumable state")


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set) -> Any:
    """The inverse of :class:`_Encoder` (a ValueError on anything it did not write)."""
    if isinstance(node, list):
        return [_decode(v, tensors, used) for v in node]
    if not isinstance(node, dict):
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise ValueError(f"unexpected JSON value {node!r}")
    if len(node) != 1:
        raise ValueError(f"unexpected JSON object with keys {sorted(node)[:4]}")
    (tag, value), = node.items()
    if tag == "dict":
        return {_hashable(_decode(k, tensors, used)): _decode(v, tensors, used) for k, v in value}
    if tag == "tuple":
        return tuple(_decode(v, tensors, used) for v in value)
    if tag == "float" and value in ("nan", "inf", "-inf"):
        return float(value)
    if tag in ("tensor", "ndarray"):
        return _decode_array(tag, value, tensors, used)
    raise ValueError(f"unknown tag {tag!r}")


def _decode_array(tag: str, value: Any, tensors: dict[str, torch.Tensor], used: set) -> Any:
    """A ``{"tensor": name}`` or ``{"ndarray": [name, dtype, shape]}`` reference resolved."""
    name = value if tag == "tensor" else value[0]
    if not isinstance(name, str) or name not in tensors:
        raise ValueError(f"tensor {name!r} is referenced but not stored")
    used.add(name)
    if tag == "tensor":
        return tensors[name]
    _, dtype, shape = value
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise ValueError(f"ndarray {name!r} of Python objects")
    return np.frombuffer(tensors[name].numpy().tobytes(), dt).reshape(shape).copy()


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)) or isinstance(key, torch.Tensor) or isinstance(key, np.ndarray):
        raise ValueError(f"a mapping key of type {type(key).__name__}")
    return key


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings, None) to ONE
    safetensors file, atomically: a kill at any moment leaves the previous file or the new one."""
    enc = _Encoder()
    tree = enc.encode(state)
    metadata = {"format": STATE_FORMAT, "samft_version": __version__,
                "state": json.dumps(tree, allow_nan=False, separators=(",", ":"))}
    atomic_write_bytes(path, st_save(enc.tensors, metadata=metadata))


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """The dict given to :func:`save_resume_state`, equal in structure (tuples, int keys, numpy arrays);
    an old ``state.pt`` is read without unpickling code. A CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no resumable state in this run directory")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] != b"{":  # not safetensors (8-byte header length, then the JSON header)
        if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # neither torch.save's zip nor a bare pickle
            raise CheckpointError(f"{path}: not a samft resumable state (neither a safetensors nor a PyTorch file)")
        state = _load_legacy(path)
    else:
        tensors, meta = read_safetensors(path, "resumable state")
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: not a samft resumable state (metadata format {meta.get('format')!r}, "
                                  f"expected {STATE_FORMAT!r})")
        used: set = set()
        tree = parse_json(meta.get("state", "null"), path, "the resumable state", STATE_DEPTH)
        try:
            state = _decode(tree, tensors, used)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: the resumable state is damaged ({e})") from None
        if set(tensors) - used:
            raise CheckpointError(f"{path}: the resumable state is damaged ({len(set(tensors) - used)} stored "
                                  f"tensors are not referenced, e.g. {sorted(set(tensors) - used)[0]!r})")
    _check_resume_shape(path, state)
    return state


def _load_legacy(path: Path) -> Any:
    """A ``torch.save`` state of samft <= 0.1: weights only, plus numpy's array reconstruction (RNG state)."""
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        allowed.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy 1.x
        allowed.append(np.core.multiarray._reconstruct)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)  # by content
    except Exception as e:  # noqa: BLE001 - an UnpicklingError for code, anything else for damage
        raise CheckpointError(f"{path}: not a readable samft state ({load_failure(e)})") from None


def _check_resume_shape(path: Path, state: Any) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a samft resumable state (holds a {type(state).__name__})")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a samft resumable state (no {', '.join(missing)}; an export or an "
                              f"adapter cannot be resumed)")
    for key in ("trainable", "optimizer", "scheduler", "progress"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: {key} is a {type(state[key]).__name__}, expected a mapping")
    bad = [k for k, v in state["trainable"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: trainable {bad[0]!r} is not a tensor")
    field(state["progress"], "step", int, path, "progress", default=0, lo=0)
    field(state["progress"], "epoch", int, path, "progress", default=0, lo=0)
    field(state["progress"], "since_best", int, path, "progress", default=0, lo=0)  # train.patience's count


read = load_resume_state
write = save_resume_state
