"""``adapter.safetensors`` (and ``adapter_last.safetensors``): the trainable tensors only (PEFT layers +
decoder + the modules' ``adapter_buffers``), with metadata naming the samft version, SAM type, the base
checkpoint's sha256, the PEFT method, its placement (``peft_blocks``: ``all`` or the resolved blocks, ``8-11 of
12``) and the attention function. Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save as st_save
from torch import nn

from samft.version import __version__
from samft.engine.artifacts.fileio import atomic_write_bytes, fail, read_safetensors
from samft.errors import CheckpointError

KIND = "adapter"
ADAPTER_FORMAT = "samft-adapter-1"
FORMAT = ADAPTER_FORMAT
_META_LIMIT = 1 << 16  # characters of one metadata value (a config is a few KiB)


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong to the trained model although no optimizer changes them, by model name: those a
    module lists in its ``adapter_buffers`` attribute (the text class head's class-name embeddings)."""
    out = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "adapter_buffers", ()):
            out[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter holds: every parameter that requires grad, and the modules' ``adapter_buffers``,
    by model name."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach() for n, b in adapter_buffers(model).items()})
    return state


def save_adapter(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> None:
    """Write ``model``'s trainable tensors with ``meta`` (strings, or JSON of other values) atomically."""
    tensors = {n: t.to("cpu").contiguous().clone() for n, t in trainable_state(model).items()}
    metadata = {"format": ADAPTER_FORMAT, "samft_version": __version__}
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; a CheckpointError naming the file and the field otherwise."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != ADAPTER_FORMAT:
        fail(path, f"not a samft adapter (metadata format {metadata.get('format')!r})")
    for key, value in metadata.items():
        if len(value) > _META_LIMIT:
            fail(path, f"field {key!r} holds {len(value)} characters, expected at most {_META_LIMIT}")
    return tensors, metadata


read = read_adapter


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an adapter file alone (its header; no tensor is read), checked as :func:`read_adapter`
    checks it: a CheckpointError naming the file and the field otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        fail(path, "adapter file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        fail(path, f"not a valid safetensors file ({e})")
    if metadata.get("format") != ADAPTER_FORMAT:
        fail(path, f"not a samft adapter (metadata format {metadata.get('format')!r})")
    for key, value in metadata.items():
        if len(value) > _META_LIMIT:
            fail(path, f"field {key!r} holds {len(value)} characters, expected at most {_META_LIMIT}")
    return metadata


def check_adapter_meta(path: str | Path, meta: dict[str, str], expected: dict[str, str]) -> None:
    """Refuse an adapter trained on another model family (SAM 1 / SAM 2.1), SAM type, base checkpoint, PEFT method or attention function
    (``bra`` vs SAM's dense attention; eager and sdpa are the same function)."""
    from samft.model.attention import attention_function

    labels = {"family": "model family (model.family)", "sam_type": "SAM type", "base_sha256": "base checkpoint sha256",
              "peft_method": "PEFT method", "attention": "encoder attention (model.attention)",
              "peft_blocks": "PEFT placement (peft.blocks)"}
    defaults = {"family": "sam", "peft_blocks": "all"}  # adapters before SAM 2.1 are SAM 1's; before placement, all
    for key, want in expected.items():
        got = meta.get(key, defaults.get(key))
        differ = (attention_function(got) != attention_function(want)) if key == "attention" and got and want \
            else got != want
        if got is not None and want and differ:
            raise CheckpointError(f"{path}: adapter was trained with {labels.get(key, key)} {got!r}, "
                                  f"but this model has {want!r}")


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved trainable tensors (and adapter buffers) into the model; the key sets must match exactly."""
    own = {**dict(model.named_parameters()), **adapter_buffers(model)}
    wanted = set(trainable_state(model))
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"{source}: adapter does not fit this model: {len(missing)} missing tensors "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if own[name].shape != t.shape:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                      f"{tuple(own[name].shape)}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CheckpointError(f"{source}: tensor {name} holds {bad} NaN/infinite value(s) of {t.numel()}; "
                                      f"refusing to use it")
            own[name].copy_(t.to(own[name].device, own[name].dtype))


def load_adapter(model: nn.Module, path: str | Path, expected: Optional[dict[str, str]] = None,
                 adapter: Optional[tuple[dict[str, torch.Tensor], dict[str, str]]] = None) -> dict[str, str]:
    """Check ``path``'s metadata against ``expected`` and load its tensors into ``model`` (``adapter``: its
    (tensors, metadata) when already read)."""
    tensors, meta = adapter or read_adapter(path)
    check_adapter_meta(path, meta, expected or {})
    load_trainable(model, tensors, str(path))
    return meta




write = save_adapter


def adapter_expectations(cfg, base_sha256: str, model: nn.Module) -> dict[str, str]:
    """What an adapter's metadata must match to be loaded on the model of ``cfg`` (``model``: the built model,
    whose encoder records the resolved ``peft.blocks``, when the method was placed on it)."""
    expected = {"family": cfg.model.family, "sam_type": cfg.model.type, "base_sha256": base_sha256,
                "peft_method": cfg.peft.method, "attention": cfg.model.attention}
    placement = getattr(model.image_encoder, "peft_blocks", None)
    if placement is not None:
        expected["peft_blocks"] = placement
    return expected
