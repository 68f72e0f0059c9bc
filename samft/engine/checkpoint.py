"""Run-directory files, all written atomically (write a temporary file, fsync, rename).

- ``adapter.safetensors``: the trainable tensors only (PEFT layers + decoder), with metadata naming the
  samft version, SAM type, the base checkpoint's sha256 and the PEFT method.
- ``state.pt``: everything ``--resume`` needs (trainable tensors, optimizer, scheduler, step, RNG).
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from samft import __version__
from samft.errors import CheckpointError

ADAPTER_FORMAT = "samft-adapter-1"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changes: every parameter that requires grad, by its model name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> None:
    tensors = {n: t.to("cpu").contiguous().clone() for n, t in trainable_state(model).items()}
    metadata = {"format": ADAPTER_FORMAT, "samft_version": __version__}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def read_safetensors(path: str | Path, what: str = "adapter") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file (a CheckpointError naming it when unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    return tensors, metadata


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a samft adapter (metadata format {metadata.get('format')!r})")
    return tensors, metadata


def check_adapter_meta(path: str | Path, meta: dict[str, str], expected: dict[str, str]) -> None:
    """Refuse an adapter trained on another SAM type, base checkpoint, PEFT method or attention function
    (``bra`` vs SAM's dense attention; eager and sdpa are the same function)."""
    from samft.model.attention import attention_function

    labels = {"sam_type": "SAM type", "base_sha256": "base checkpoint sha256", "peft_method": "PEFT method",
              "attention": "encoder attention (model.attention)"}
    for key, want in expected.items():
        got = meta.get(key)
        differ = (attention_function(got) != attention_function(want)) if key == "attention" and got and want \
            else got != want
        if got is not None and want and differ:
            raise CheckpointError(f"{path}: adapter was trained with {labels.get(key, key)} {got!r}, "
                                  f"but this model has {want!r}")


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable tensors into the model; the key sets must match exactly."""
    own = dict(model.named_parameters())
    wanted = {n for n, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{source}: adapter does not fit this model: {len(missing)} missing tensors "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if own[name].shape != t.shape:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(own[name].shape)}")
            own[name].copy_(t.to(own[name].device, own[name].dtype))


def load_adapter(model: nn.Module, path: str | Path, expected: Optional[dict[str, str]] = None) -> dict[str, str]:
    tensors, meta = read_adapter(path)
    check_adapter_meta(path, meta, expected or {})
    load_trainable(model, tensors, str(path))
    return meta


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


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no resumable state (state.pt) in this run directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read the resumable state ({type(e).__name__}: {e})") from None
