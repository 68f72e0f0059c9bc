"""An ONNX export (``samft export --onnx``) as the model of samft's prediction and evaluation pipeline.

``samft predict/eval --run model.onnx`` (and ``Segmenter.from_run("model.onnx")``) load the file with
:func:`load_onnx`: an onnxruntime session behind :class:`OnnxModel`, which the pipeline calls as it calls
a ``SemanticSAM`` (a normalised (B, 3, S, S) batch -> :class:`~samft.model.semantic.SegOutput`), so the
pre-processing, resizing back, thresholds, masks, overlays, probability maps, tiling and metrics are
samft's own. The file's ``samft.*`` metadata (:mod:`samft.engine.artifacts.onnx_meta`) gives the input
size, the task, the class names and the threshold; the run's config, stored by exports of this version
(``samft.config_yaml``), gives the rest (test sets, ignore index, input geometry); an export without it
gets the defaults.

What differs from the PyTorch model: a binary graph returns the mask logits at the input size, resized
back exactly as the run's own prediction resizes them (the same function within fp32 rounding). A
multi-class graph returns MaskFormer's class scores at the input size, which are resized (the run's own
prediction resizes the mask logits and forms the scores after): the label maps differ at a few class
boundary pixels (the tests bound it).

The session runs on onnxruntime's CPU provider, or its CUDA provider for ``--device cuda`` where that
provider is installed (``onnxruntime-gpu``); otherwise ``--device cuda`` is refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from samft.config import Config, config_from_dict, safe_yaml
from samft.deploy_onnx import run_session
from samft.engine.artifacts import onnx_meta
from samft.engine.artifacts.fileio import fail
from samft.errors import CheckpointError, SamftError
from samft.model.semantic import SegOutput

ONNX_MAGIC = b"\x08"  # a ModelProto starts with field 1 (ir_version, a varint): tag byte 0x08
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def is_onnx_file(path: str | Path) -> bool:
    """Whether ``path`` is a file to read as ONNX: named ``*.onnx``, or starting as a ModelProto does (neither a
    zip archive, as ``torch.save`` writes, nor a pickle)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with path.open("rb") as f:
            return f.read(1) == ONNX_MAGIC
    except OSError:
        return False


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise SamftError("running an ONNX model needs the onnxruntime package: pip install 'samft[onnx]'") from None
    return onnxruntime


def onnx_device(device: str) -> torch.device:
    """``--device`` for an ONNX model: ``auto`` is CUDA where both PyTorch and onnxruntime have it, else the CPU;
    ``cuda[:N]`` needs onnxruntime's CUDA provider."""
    from samft.engine.runtime import pick_device

    ort = require_onnxruntime()
    has_cuda = CUDA in ort.get_available_providers()
    if device == "auto":
        return torch.device("cuda" if has_cuda and torch.cuda.is_available() else "cpu")
    picked = pick_device(device)
    if picked.type not in ("cpu", "cuda") or (picked.type == "cuda" and not has_cuda):
        raise SamftError(f"--device {device}: onnxruntime here has no provider for it (it has "
                         f"{', '.join(ort.get_available_providers())}); use --device cpu, or install onnxruntime-gpu")
    return picked


def _providers(device: torch.device) -> list:
    if device.type == "cuda":
        return [(CUDA, {"device_id": device.index or 0}), CPU]
    return [CPU]


class OnnxModel(nn.Module):
    """An onnxruntime session called like ``SemanticSAM`` in inference: (B, 3, S, S) -> ``SegOutput`` with the
    graph's mask logits (binary) or its class scores (multi-class, ``class_scores``)."""

    def __init__(self, session: Any, path: Path, img_size: int, num_classes: int) -> None:
        super().__init__()
        self.session, self.path, self.img_size, self.num_classes = session, path, img_size, num_classes

    def forward(self, images: torch.Tensor) -> SegOutput:
        batch = np.ascontiguousarray(images.detach().float().cpu().numpy())
        out = torch.from_numpy(run_session(self.session, batch))  # in chunks a static-batch graph accepts
        out = out.to(images.device)
        if self.num_classes > 1:
            return SegOutput(out, None, {}, class_scores=out)
        return SegOutput(out, None, {})


def _stored_config(meta: dict, path: Path) -> Config:
    if "config_yaml" not in meta:  # an export of an earlier version: the metadata's fields, defaults elsewhere
        data = {"model": {"img_size": meta["img_size"]}, "eval": {"threshold": meta["threshold"]},
                "data": {"classes": meta.get("classes", [])}}
        return config_from_dict(data)
    try:
        return config_from_dict(safe_yaml(meta["config_yaml"]) or {})
    except yaml.YAMLError as e:
        fail(path, f"field 'config_yaml' is not valid YAML ({str(e).splitlines()[0]})")
    except SamftError as e:
        fail(path, f"field 'config_yaml' is not a valid config for this samft: {e}")


def onnx_config(meta: dict, path: Path) -> Config:
    """The config of an ONNX export: the stored one (or defaults), checked against the graph's metadata."""
    cfg = _stored_config(meta, path)
    stored = {"img_size": cfg.model.img_size, "threshold": cfg.eval.threshold, "classes": list(cfg.data.classes)}
    for key, value in stored.items():
        if meta.get(key, []) != value:
            fail(path, f"field {key!r} is {meta.get(key)!r} but the stored config (field 'config_yaml') says "
                       f"{value!r}: the metadata was edited")
    return cfg


def _session(path: Path, device: torch.device) -> Any:
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), options, providers=_providers(device))
    except Exception as e:  # noqa: BLE001 - any onnxruntime failure means "not a runnable ONNX file"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable ONNX model ({first})") from None


def _check_graph(session: Any, path: Path, img_size: int) -> None:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[1] != 3 or shape[2:] != [img_size, img_size]:
        fail(path, f"field 'img_size' is {img_size} but the graph's input has shape {shape} (expected "
                   f"[batch, 3, {img_size}, {img_size}])")


def load_onnx(path: str | Path, device: torch.device) -> tuple[OnnxModel, Config]:
    """The ONNX export ``path`` as a model of the pipeline (on ``device``'s provider) and its config."""
    path = Path(path)
    session = _session(path, device)
    meta = onnx_meta.check(session.get_modelmeta().custom_metadata_map, path)
    _check_graph(session, path, meta["img_size"])
    cfg = onnx_config(meta, path)
    classes = meta.get("classes", [])
    return OnnxModel(session, path, meta["img_size"], max(1, len(classes))).eval(), cfg
