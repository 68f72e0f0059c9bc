"""The files ``samft export`` writes, and their one reader: a merged SAM checkpoint and its head file, an
unmerged samft model, a pruned model (see :mod:`samft.engine.artifacts.export` for what each holds).

Every file samft writes names itself: the head file's metadata and the unmerged / pruned dicts carry
``kind`` and ``format``. A merged checkpoint is plain SAM (exactly SAM's keys, which segment_anything
loads strictly) or plain SAM 2.1 (``{"model": SAM2Base's state dict}``, which sam2 loads strictly), so it
is recognised through its head file. Files of earlier versions, without
``kind``, are recognised by their ``format`` or (a merged checkpoint) by holding tensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save as st_save

from samft.engine.artifacts.fileio import (atomic_torch_save, atomic_write_bytes, fail, field, int_text, parse_json,
                                           read_safetensors)
from samft.errors import CheckpointError, SamftError, load_failure
from samft.files import json_depth

HEAD_FORMAT = "samft-merged-head-1"
UNMERGED_FORMAT = "samft-unmerged-model-1"
PRUNED_EXPORT_FORMAT = "samft-pruned-model-1"
MERGED, HEAD, UNMERGED, PRUNED = "merged_checkpoint", "merged_head", "unmerged_model", "pruned_model"
FORMATS = {HEAD: HEAD_FORMAT, UNMERGED: UNMERGED_FORMAT, PRUNED: PRUNED_EXPORT_FORMAT, MERGED: "sam-state-dict"}
MAX_DEPTH = 8  # a state dict is flat; the dicts samft writes are two levels deep


@dataclass
class Export:
    """One export as read: its ``kind``, the file's dict (or a merged checkpoint's state dict) and, for a
    merged checkpoint, its head's tensors and metadata."""

    kind: str
    path: Path
    data: dict
    head_file: Optional[Path] = None
    head: dict = dc_field(default_factory=dict)
    head_meta: dict = dc_field(default_factory=dict)


def head_path(out: str | Path) -> Path:
    """``model.pth`` -> ``model.head.safetensors`` (next to the merged checkpoint)."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.head.safetensors")


def _torch_read(path: Path) -> Any:
    if not path.is_file():
        fail(path, "exported model not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable export"
        fail(path, f"not a readable PyTorch file ({load_failure(e)}); samft reads a run directory, a model file "
                   f"of samft export --merged (.pth) or an ONNX file of samft export --onnx (.onnx)")


def recognise(path: Path, data: Any) -> str:
    """The kind of an export file's content: its stored ``kind`` (checked against its ``format``), else (a
    file of an earlier version) its ``format``, else a dict of tensors only is a merged SAM checkpoint."""
    if not isinstance(data, dict):
        fail(path, f"neither a merged SAM checkpoint nor an unmerged samft export (holds a {type(data).__name__})")
    if "kind" in data:
        kind = field(data, "kind", str, path)
        if kind not in (UNMERGED, PRUNED):
            fail(path, f"field 'kind' is {kind[:40]!r}, expected {UNMERGED!r} or {PRUNED!r}")
        if data.get("format") != FORMATS[kind]:
            fail(path, f"field 'format' is {data.get('format')!r}, expected {FORMATS[kind]!r} for a {kind}")
        return kind
    legacy = {UNMERGED_FORMAT: UNMERGED, PRUNED_EXPORT_FORMAT: PRUNED}
    if isinstance(data.get("format"), str) and data["format"] in legacy:
        return legacy[data["format"]]
    if _tensors_only(data) or (set(data) == {"model"} and _tensors_only(data["model"])):
        return MERGED  # SAM's state dict, or SAM 2.1's layout: {"model": SAM2Base's state dict}
    fail(path, "neither a merged SAM checkpoint nor an unmerged samft export")


def _tensors_only(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())


def _check_model_dict(path: Path, data: dict, kind: str) -> None:
    if json_depth(data, MAX_DEPTH) > MAX_DEPTH:
        fail(path, f"nested more than {MAX_DEPTH} levels deep (damaged or not samft's)")
    for key in ("config_yaml", "peft_method"):
        field(data, key, str, path)
    field(data, "sam_type", str, path, default="")
    state = data.get("state_dict")
    if not isinstance(state, dict):
        fail(path, "holds no state dict (a damaged samft export?)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        fail(path, f"field 'state_dict.{bad[0]}' is not a tensor")
    if kind == PRUNED:
        field(data, "merged", bool, path, default=False)
        arch = parse_json(field(data, "architecture", str, path), path, "field 'architecture'")
        if not isinstance(arch, dict):
            fail(path, f"field 'architecture' holds a {type(arch).__name__}, expected a mapping")
        data["architecture"] = arch


def read_head(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A merged checkpoint's head file: (tensors, metadata), the metadata checked."""
    head, meta = read_safetensors(path, "decoder head")
    if meta.get("format") != HEAD_FORMAT:
        fail(path, f"not a samft decoder head (metadata format {meta.get('format')!r})")
    if meta.get("kind", HEAD) != HEAD:
        fail(path, f"field 'kind' is {meta['kind'][:40]!r}, expected {HEAD!r}")
    field(meta, "config_yaml", str, path)
    int_text(meta, "num_queries", path, 1, 1 << 16)
    int_text(meta, "num_classes", path, 1, 1 << 16)
    if "img_size" in meta:
        int_text(meta, "img_size", path, 16, 1 << 15)
    return head, meta


def read(path: str | Path, head_file: Optional[str | Path] = None) -> Export:
    """Read and check an export (``head_file``: a merged checkpoint's head, default next to it)."""
    path = Path(path)
    data = _torch_read(path)
    kind = recognise(path, data)
    if kind != MERGED:
        _check_model_dict(path, data, kind)
        return Export(kind, path, data)
    head_file = Path(head_file) if head_file else head_path(path)
    if not head_file.is_file():
        raise CheckpointError(f"{path}: a merged SAM checkpoint needs its decoder head {head_file} (written by "
                              f"samft export next to it)")
    head, meta = read_head(head_file)
    state = data["model"] if set(data) == {"model"} else data  # SAM 2.1's layout holds it under "model"
    return Export(MERGED, path, state, head_file, head, meta)


def write_merged(out: Path, state: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                 meta: dict[str, str]) -> list[Path]:
    """A plain SAM (or SAM 2.1) checkpoint ``out`` and its head file (tensors + metadata naming kind and format)."""
    head_file = head_path(out)
    meta = {"kind": HEAD, "format": HEAD_FORMAT, **meta}
    _guarded(out, lambda: atomic_torch_save(state, out))
    _guarded(head_file, lambda: atomic_write_bytes(head_file, st_save(head, metadata=meta)))
    return [out, head_file]


def _guarded(path: Path, write) -> None:
    try:
        write()
    except OSError as e:
        raise SamftError(f"{path}: cannot write the export ({e.strerror or e})") from None


def write_model(out: Path, kind: str, record: dict[str, Any]) -> None:
    """An unmerged or pruned model: ``record`` (config, state dict ...) with its kind and format."""
    if kind not in (UNMERGED, PRUNED):
        raise ValueError(f"write_model: kind {kind!r}")
    record = {"kind": kind, "format": FORMATS[kind], **record}
    if kind == PRUNED and not isinstance(record.get("architecture"), str):
        record["architecture"] = json.dumps(record["architecture"])
    atomic_torch_save(record, out)


def write(out: str | Path, kind: str, *args: Any) -> None:
    """One writer for the registry: :func:`write_merged` (``kind`` merged) or :func:`write_model`."""
    if kind == MERGED:
        write_merged(Path(out), *args)
    else:
        write_model(Path(out), kind, *args)
