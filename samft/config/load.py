"""Reading a config: strict YAML, ``key=value`` overrides, migration of renamed keys, and where an error
comes from (the file or the command line)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from samft.config.coerce import from_dict
from samft.config.dump import dump_yaml
from samft.config.root import Config, validate
from samft.errors import ConfigError


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: ``*name`` repeats a node by reference, and nine levels of ten-fold
    aliases in under 1 KiB expand to 10^9 nodes (a 'billion laughs' config hangs anything that walks it). samft
    configs never need them; one is refused where it stands."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not read in samft configs", mark)
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases (:class:`_NoAliasLoader`): the one YAML reader of every config."""
    loader = _NoAliasLoader(text)  # a SafeLoader: plain YAML types only, no tags that construct objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``key=value`` into the nested mapping ``data`` (validated later with the rest)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


# keys renamed since an earlier version: old dotted key -> new one (old run directories still load)
RENAMED = {("loss", "balance_weight"): ("loss", "aux", "balance")}


def _move(data: dict, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    node = data
    for part in old[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and old[-1] in node:
        value = node.pop(old[-1])
        target = data
        for part in new[:-1]:
            target = target.setdefault(part, {})
        target.setdefault(new[-1], value)


def migrate(data: dict) -> dict:
    """Move every key of :data:`RENAMED` to its new name (a value already at the new name wins)."""
    for old, new in RENAMED.items():
        _move(data, old, new)
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    data = migrate(apply_overrides(json.loads(json.dumps(data or {})), overrides or []))
    return validate(from_dict(Config, data))


def _blame(data: dict, overrides: list[str] | None, message: str, path: Path) -> str:
    """Where an error comes from: the file when the file alone has it, else the command line."""
    if not overrides:
        return str(path)
    try:
        config_from_dict(data)
    except ConfigError as e:
        if str(e) == message:
            return str(path)
    return "command line (key=value)"


def yaml_error(e: Exception) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    context = getattr(e, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}" + (f" ({' '.join(context.split())})" if context else "")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = safe_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML config is expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, peft:, ...), got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config strictly, apply overrides, validate, and default ``output.dir``."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        cfg = config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{_blame(data, overrides, str(e), path)}: {e}") from None
    if cfg.output.dir is None:
        cfg.output.dir = str(Path("runs") / path.stem)
    cfg.model.pruned = file_beside(path.parent, cfg.model.pruned)  # a run's config.yaml: its pruned.safetensors
    return cfg


def file_beside(folder: Path, value: str | None) -> str | None:
    """A relative path naming a file in ``folder`` (the config's own folder: a pruned run stores
    ``model.pruned: pruned.safetensors``) as that file's path; anything else unchanged (a relative path
    naming no file there stays relative to the working directory)."""
    if not value or Path(value).expanduser().is_absolute() or not (Path(folder) / value).is_file():
        return value
    return str((Path(folder) / value).absolute())


def absolute_paths(cfg: Config) -> Config:
    """``data.root`` and ``model.checkpoint`` made absolute (from the working directory), as a new run stores
    them, so that it can be evaluated from anywhere."""
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.model.checkpoint:
        cfg.model.checkpoint = str(Path(cfg.model.checkpoint).expanduser().resolve())
    return cfg


def resolved_yaml(path: str | Path, overrides: list[str] | None = None, every_method: bool = False) -> str:
    """The ``config.yaml`` a training of ``path`` with ``overrides`` would write: the protocol applied, the
    overrides set, the defaults filled in and the paths made absolute (``samft config show``);
    ``every_method``: every PEFT method's section, not only the active one."""
    return dump_yaml(absolute_paths(load_config(path, overrides)), every_method)
