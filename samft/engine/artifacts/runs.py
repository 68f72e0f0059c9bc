"""Locating and loading run directories."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from samft.config import Config, config_from_dict, yaml_error
from samft.engine.artifacts.checkpoint import load_adapter, read_adapter
from samft.errors import ConfigError, SamftError
from samft.model import SemanticSAM, build_model
from samft.slip.text import stored_text_embeddings

CONFIG_FILE = "config.yaml"
ADAPTER_FILE = "adapter.safetensors"  # best checkpoint (by train.metric)
LAST_ADAPTER_FILE = "adapter_last.safetensors"
STATE_FILE = "state.safetensors"  # the resumable state (never a pickle)
LEGACY_STATE_FILE = "state.pt"  # an earlier version's state: read with weights_only=True
METRICS_FILE = "metrics.csv"
EVAL_FILE = "eval.json"
PLOT_FILE = "curves.png"
SPLIT_FILE = "split.json"
MARKER_FILE = ".samft-run"  # a folder samft created
RESUMES_FILE = "resumes.jsonl"
ARCH_FILE = "architecture.json"  # a pruned run (samft prune): the architecture and what the search found
PRUNED_FILE = "pruned.safetensors"  # a pruned run: the pruned model's whole state (config key model.pruned)

RUN_FILES = (CONFIG_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE, STATE_FILE, LEGACY_STATE_FILE, METRICS_FILE, EVAL_FILE,
             PLOT_FILE, SPLIT_FILE, RESUMES_FILE, MARKER_FILE, ARCH_FILE, PRUNED_FILE, ".lock")


def state_file(run_dir: str | Path) -> Path:
    """The run's resumable state: ``state.safetensors``, or an earlier version's ``state.pt``."""
    run_dir = Path(run_dir)
    legacy = run_dir / LEGACY_STATE_FILE
    return legacy if legacy.is_file() and not (run_dir / STATE_FILE).is_file() else run_dir / STATE_FILE


def is_run_file(path: str | Path) -> bool:
    """Whether ``path`` (followed through links) is one of a run directory's own files (config.yaml,
    adapter*, state*, metrics.csv ...), which other commands must never write to."""
    path = Path(path).resolve()
    if not (path.parent / CONFIG_FILE).is_file():
        return False
    return path.name in RUN_FILES or path.name.startswith(("adapter", "state", ".state", ".adapter"))


def newest_run(root: str | Path = "runs") -> Path:
    """The most recently modified run directory (one holding an adapter) under ``root``."""
    root = Path(root)
    runs = [p.parent for p in root.glob(f"*/{ADAPTER_FILE}")] if root.is_dir() else []
    if not runs:
        raise SamftError(f"no run found under {root}/ (a run directory holds {ADAPTER_FILE}); pass --run DIR")
    return max(runs, key=lambda p: (p / ADAPTER_FILE).stat().st_mtime)


def read_run_config(run_dir: str | Path, overrides: Optional[list[str]] = None) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise SamftError(f"{run_dir}: not a run directory ({CONFIG_FILE} not found)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: the run's config is not valid YAML ({yaml_error(e)}); tags such as "
                          f"!!python/... are never read") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run's config is a {type(data).__name__}, expected a mapping of sections")
    try:
        return config_from_dict(data, overrides)
    except SamftError as e:
        raise SamftError(f"{path}: {e}") from None


def adapter_expectations(cfg: Config, base_sha256: str) -> dict[str, str]:
    return {"sam_type": cfg.model.type, "base_sha256": base_sha256, "peft_method": cfg.peft.method,
            "attention": cfg.model.attention}


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
    head file, or the unmerged model): its own config comes with it.
    A pruned run (``samft prune``; config key ``model.pruned``) is rebuilt the same way: ``build_model``
    builds the pruned architecture with the pruned state as its base, then the adapter is loaded on it.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        from samft.engine.artifacts.export import load_exported_with_config

        model, cfg = load_exported_with_config(run_dir, device)
        return LoadedRun(run_dir, cfg, model, {"exported": str(run_dir)})
    cfg = read_run_config(run_dir)
    locate_pruned(run_dir, cfg)
    adapter_path = run_dir / adapter
    if not adapter_path.is_file():
        raise SamftError(f"{run_dir}: no {adapter} yet (has the run finished an epoch?)")
    saved = read_adapter(adapter_path)
    built = build_model(cfg, text_emb=stored_text_embeddings(cfg, saved[0], str(adapter_path)))
    meta = load_adapter(built.model, adapter_path, adapter_expectations(cfg, built.base_sha256), saved)
    model = built.model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, meta)
