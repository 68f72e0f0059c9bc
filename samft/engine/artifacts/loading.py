"""Loading a run's model: its config, its base (a pruned run's pruned model), its adapter checked against
the base; or an exported model file with the config stored in it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from samft.config import Config
from samft.engine.artifacts.onnx_model import is_onnx_file, onnx_device
from samft.engine.artifacts.adapter import adapter_expectations, load_adapter, read_adapter
from samft.engine.artifacts.rundir import ADAPTER_FILE, ARCH_FILE, CONFIG_FILE, PRUNED_FILE, RunDir
from samft.errors import SamftError
from samft.model import SemanticSAM, build_model
from samft.slip.text import stored_text_embeddings


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    model: SemanticSAM
    meta: dict


def locate_pruned(run_dir: Path, cfg: Config) -> None:
    """A pruned run's ``model.pruned``: a relative path is the run directory's; a path that no longer exists
    (the run was moved) falls back, with a warning, to the run directory's own ``pruned.safetensors``."""
    if not cfg.model.pruned:
        if (run_dir / ARCH_FILE).is_file():
            raise SamftError(f"{run_dir}: holds {ARCH_FILE} but its config has no model.pruned (a pruned run of an "
                             f"earlier samft: set model.pruned: {run_dir / PRUNED_FILE} in its {CONFIG_FILE})")
        return
    path = Path(cfg.model.pruned).expanduser()
    if not path.is_absolute() and (run_dir / path).is_file():
        path = run_dir / path
    own = run_dir / PRUNED_FILE
    if not path.is_file() and own.is_file():
        warnings.warn(f"{run_dir}: model.pruned {cfg.model.pruned} not found; using {own} (was the run moved?)",
                      stacklevel=3)
        path = own
    cfg.model.pruned = str(path)


def load_run(run_dir: str | Path, device: torch.device, adapter: str = ADAPTER_FILE) -> LoadedRun:
    """Rebuild a run's model from its config and load its adapter (checked against the base).

    ``run_dir`` may also be an exported model file (``samft export --merged``: merged SAM checkpoint + its
    head file, or the unmerged model): its own config comes with it; or an ONNX export (``samft export
    --onnx``): an onnxruntime session in place of the model (:mod:`samft.engine.artifacts.onnx_model`).
    A pruned run (``samft prune``; config key ``model.pruned``) is rebuilt the same way: ``build_model``
    builds the pruned architecture with the pruned state as its base, then the adapter is loaded on it.
    """
    run_dir = Path(run_dir)
    if is_onnx_file(run_dir):
        from samft.engine.artifacts.onnx_model import load_onnx

        model, cfg = load_onnx(run_dir, device)
        return LoadedRun(run_dir, cfg, model, {"exported": str(run_dir), "onnx": "true"})
    if run_dir.is_file():
        from samft.engine.artifacts.export import load_exported_with_config

        model, cfg = load_exported_with_config(run_dir, device)
        return LoadedRun(run_dir, cfg, model, {"exported": str(run_dir)})
    cfg = RunDir(run_dir).read_config()
    locate_pruned(run_dir, cfg)
    adapter_path = run_dir / adapter
    if not adapter_path.is_file():
        raise SamftError(f"{run_dir}: no {adapter} yet (has the run finished an epoch?)")
    saved = read_adapter(adapter_path)
    built = build_model(cfg, text_emb=stored_text_embeddings(cfg, saved[0], str(adapter_path)))
    meta = load_adapter(built.model, adapter_path, adapter_expectations(cfg, built.base_sha256, built.model), saved)
    model = built.model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, meta)


def run_device(run_dir: str | Path, device: str) -> torch.device:
    """The device ``--device`` names for the model at ``run_dir``: PyTorch's (:func:`pick_device`), or for an ONNX
    export the one its onnxruntime session runs on (:func:`samft.engine.artifacts.onnx_model.onnx_device`)."""
    from samft.engine.runtime import pick_device

    return onnx_device(device) if is_onnx_file(run_dir) else pick_device(device)
