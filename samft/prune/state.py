"""The pruned-model file (``pruned.safetensors``) and building a model from it.

The file holds the whole state of a pruned ``SemanticSAM`` (the rebuilt encoder is no longer the base
checkpoint plus an adapter: sliced MLPs, derived convolutions and their BatchNorm statistics are in it)
and, in its metadata, the architecture description (``format`` ``samft-pruned-1``, ``architecture``
JSON). A config's ``model.pruned`` names such a file: :func:`samft.model.build_model` then builds the
dense model of the config (PEFT method applied), rebuilds its encoder to the architecture
(:func:`samft.prune.rebuild.build_pruned_encoder`) and loads the state strictly. That model is the
*base* of the pruned run: its fine-tuning trains the usual trainable parameters on top of it, and the
run's ``adapter.safetensors`` is checked against this file's sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from samft.prune.errors import PruneError
from samft.prune.rebuild import build_pruned_encoder

PRUNED_FORMAT = "samft-pruned-1"


def _header(data: bytes, path: Path) -> dict[str, str]:
    try:
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {}) or {}
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise PruneError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != PRUNED_FORMAT:
        raise PruneError(f"{path}: not a samft pruned model (metadata format {meta.get('format')!r}, expected "
                         f"{PRUNED_FORMAT!r})")
    return meta


def read_pruned(path: str | Path, tensors: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict, str]:
    """(architecture, state, metadata, sha256 of the file); with ``tensors`` false only the header is read
    (state empty, sha256 "")."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"model.pruned {path}: file not found (written by samft prune as pruned.safetensors)")
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= path.stat().st_size - 8:
            raise PruneError(f"{path}: not a safetensors file (no valid header)")
        data = head + f.read() if tensors else head + f.read(length)
    meta = _header(data, path)
    try:
        arch = json.loads(meta["architecture"])
    except (KeyError, ValueError) as e:
        raise PruneError(f"{path}: its metadata has no valid architecture description ({e})") from None
    state = {}
    if tensors:
        try:
            state = st_load(data)
        except SafetensorError as e:
            raise PruneError(f"{path}: unreadable tensors ({e})") from None
    return arch, state, meta, "pruned:" + hashlib.sha256(data).hexdigest() if tensors else ""


def load_pruned_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of a pruned model's whole state into ``model`` (already rebuilt to its architecture)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PruneError(f"{source}: does not fit the model of its config and architecture "
                         f"({str(e).splitlines()[0]})") from None


def apply_pruned(model: nn.Module, path: str | Path, meta: bool = False) -> str:
    """Rebuild ``model.image_encoder`` (a SemanticSAM) to the architecture in ``path`` and, unless ``meta``
    (structure only), load the file's state. Returns the file's identity (``pruned:<sha256>``)."""
    arch, state, _, sha = read_pruned(path, tensors=not meta)
    build_pruned_encoder(model.image_encoder, arch)
    if not meta:
        load_pruned_state(model, state, str(path))
    return "" if meta else sha


def describe_pruned(path: str | Path, size: int, encoder: nn.Module, dense: nn.Module) -> dict[str, Any]:
    """What ``samft info`` adds for a pruned model (``model.pruned`` = ``path``), at input ``size``:
    ``encoder_gmacs`` (the pruned encoder's), ``encoder_gmacs_dense`` and per block the attention choice,
    kept MLP units and GMACs before/after. ``encoder``: the pruned encoder, ``dense``: the same model's encoder
    before pruning (meta tensors are fine for both)."""
    from samft.prune.flops import encoder_block_flops, gmacs
    from samft.prune.rebuild import summary

    arch = read_pruned(path, tensors=False)[0]
    before, after = encoder_block_flops(dense, size), encoder_block_flops(encoder, size)
    blocks = []
    for i, (entry, b, a) in enumerate(zip(arch["blocks"], before["blocks"], after["blocks"])):
        blocks.append({"block": i, "attn": entry["attn"], "mlp_units": entry["mlp_units"],
                       "mlp_units_dense": out_units(dense.blocks[i]),
                       "gmacs_before": gmacs(b["mixer"] + b["mlp"]), "gmacs_after": gmacs(a["mixer"] + a["mlp"])})
    return {"encoder_gmacs": gmacs(after["total"]), "encoder_gmacs_dense": gmacs(before["total"]),
            "pruned_architecture": summary(arch), "pruned_blocks": blocks}


def out_units(block: nn.Module) -> int:
    """Hidden units of a dense block's MLP."""
    from samft.prune.search_block import out_features

    return out_features(block.mlp.lin1)
