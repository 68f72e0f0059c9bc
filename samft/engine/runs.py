"""Locating and loading run directories."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from samft.config import Config, config_from_dict, yaml_error
from samft.engine.checkpoint import load_adapter
from samft.errors import ConfigError, SamftError
from samft.model import SemanticSAM, build_model

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

RUN_FILES = (CONFIG_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE, STATE_FILE, LEGACY_STATE_FILE, METRICS_FILE, EVAL_FILE,
             PLOT_FILE, SPLIT_FILE, RESUMES_FILE, MARKER_FILE, ".lock")


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


def load_run(run_dir: str | Path, device: torch.device, adapter: str = ADAPTER_FILE) -> LoadedRun:
    """Rebuild a run's model from its config and load its adapter (checked against the base)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    adapter_path = run_dir / adapter
    if not adapter_path.is_file():
        raise SamftError(f"{run_dir}: no {adapter} yet (has the run finished an epoch?)")
    built = build_model(cfg)
    meta = load_adapter(built.model, adapter_path, adapter_expectations(cfg, built.base_sha256))
    model = built.model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, meta)
