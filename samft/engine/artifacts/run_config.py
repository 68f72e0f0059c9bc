"""A run's ``config.yaml``: the resolved config it was trained with (YAML, safe tags only)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from samft.config import Config, config_from_dict, yaml_error
from samft.engine.artifacts.fileio import MAX_DEPTH, atomic_write_text, depth
from samft.errors import ConfigError, SamftError

KIND = "run_config"
FORMAT = "samft-config-yaml-1"  # the config's own schema is checked by config_from_dict
MAX_BYTES = 1 << 20  # a resolved config is a few KiB


def _load_yaml(path: Path) -> object:
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError(f"{path}: the run's config is {path.stat().st_size} bytes, expected at most {MAX_BYTES}")
        return yaml.safe_load(path.read_text())
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
    if depth(data) > MAX_DEPTH:
        raise ConfigError(f"{path}: the run's config is nested more than {MAX_DEPTH} levels deep")
    try:
        return config_from_dict(data, overrides)
    except SamftError as e:
        raise SamftError(f"{path}: {e}") from None


def write(path: str | Path, config_yaml: str) -> None:
    """Write the resolved config (``samft.config.dump_yaml``'s text) atomically."""
    atomic_write_text(path, config_yaml)
