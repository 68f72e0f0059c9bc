"""A run's ``config.yaml``: the resolved config it was trained with (YAML, safe tags only).

A run is relocatable: a file of the run's own that the config names (a pruned run's ``model.pruned``,
its ``pruned.safetensors``) is stored relative to the run folder, and read back as the path in the folder
the config is read from. An absolute path (an earlier version's, or a file outside the run) is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from samft.config import Config, config_from_dict, file_beside, safe_yaml, yaml_error
from samft.engine.artifacts.fileio import MAX_DEPTH, atomic_write_text
from samft.files import json_depth
from samft.errors import ConfigError, SamftError

KIND = "run_config"
FORMAT = "samft-config-yaml-1"  # the config's own schema is checked by config_from_dict
MAX_BYTES = 1 << 20  # a resolved config is a few KiB


def _load_yaml(path: Path) -> object:
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"{path}: the run's config is {path.stat().st_size} bytes, expected at most {MAX_BYTES}")
        return safe_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: the run's config is not valid YAML ({yaml_error(e)}); tags such as "
                          f"!!python/... are never read") from None
    except RecursionError:
        raise ConfigError(f"{path}: the run's config is nested more than {MAX_DEPTH} levels deep") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e.strerror or e})") from None


def read(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """The config in ``path`` with ``overrides`` (``key=value``) applied; a one-line error naming the file
    and the key otherwise."""
    path = Path(path)
    data = _load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the run's config is a {type(data).__name__}, expected a mapping of sections")
    if json_depth(data) > MAX_DEPTH:
        raise ConfigError(f"{path}: the run's config is nested more than {MAX_DEPTH} levels deep")
    try:
        cfg = config_from_dict(data, overrides)
    except SamftError as e:
        raise SamftError(f"{path}: {e}") from None
    cfg.model.pruned = file_beside(path.parent, cfg.model.pruned)
    return cfg


def _relative_to_run(run_dir: Path, value: object) -> object:
    """``value`` as a path relative to ``run_dir`` when it names a file directly in it, else unchanged."""
    if not isinstance(value, str) or not value or not Path(value).is_absolute():
        return value
    file = Path(value)
    try:
        if file.parent.resolve() == run_dir.resolve():
            return file.name
    except OSError:
        pass
    return value


def write(path: str | Path, config_yaml: str) -> None:
    """Write the resolved config (``samft.config.dump_yaml``'s text) atomically; ``model.pruned`` naming a
    file in the run's own folder is stored relative to it (the run can be moved or copied)."""
    path = Path(path)
    data = yaml.safe_load(config_yaml)
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("pruned"):
        relative = _relative_to_run(path.parent, model["pruned"])
        if relative != model["pruned"]:
            model["pruned"] = relative
            config_yaml = yaml.safe_dump(data, sort_keys=False)  # as samft.config.dump_yaml writes it
    atomic_write_text(path, config_yaml)
