"""The config written out: a plain mapping, its YAML (a run's ``config.yaml``) and its hash; the field table
(``samft config keys``, docs) and the keys ``--resume`` may change, both read from the schema."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import fields, is_dataclass
from typing import Any, NamedTuple, Optional

import yaml

from samft.config.coerce import type_name
from samft.config.peft import PEFT_COMMON
from samft.config.root import Config
from samft.errors import ConfigError


def _drop_new_defaults(obj: Any, out: dict) -> dict:
    """``out`` (the mapping of dataclass ``obj``) without the options declared ``hash_default=False`` that hold
    their default, in every section: options added later leave the hash of older configs as it was."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value) and isinstance(out.get(f.name), dict):
            _drop_new_defaults(value, out[f.name])
        elif f.metadata.get("hash_default") is False and f.name in out:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value == default:
                del out[f.name]
    return out


def to_dict(cfg: Config) -> dict:
    """Plain mapping of the config; ``peft`` keeps its common fields and only the active method's section;
    options added later (``hash_default=False``) are left out at their default."""
    out = dataclasses.asdict(cfg)
    out["peft"] = {k: v for k, v in out["peft"].items() if k in PEFT_COMMON or k == cfg.peft.method}
    return _drop_new_defaults(cfg, out)


def flat_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping (:func:`to_dict`'s) as {dotted key: value}; lists, nulls and empty mappings kept as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flat_dict(value, dotted))
        else:
            flat[dotted] = value
    return flat


def dump_yaml(cfg: Config, every_method: bool = False) -> str:
    """The YAML of a run's ``config.yaml``; ``every_method``: every PEFT method's section, not only the active one."""
    return yaml.safe_dump(dataclasses.asdict(cfg) if every_method else to_dict(cfg), sort_keys=False)


def config_hash(cfg: Config) -> str:
    """Short hash of the resolved config (recorded in eval.json)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _leaves(cls: type, prefix: str = ""):
    """(dotted key, field, default) for every leaf field of dataclass ``cls``, in field order."""
    for f in fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            yield from _leaves(type(default), dotted)
        else:
            yield dotted, f, default


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for docs and ``samft info``."""
    return [(dotted, repr(default), f.metadata.get("help", "")) for dotted, f, default in _leaves(cls, prefix)]


class Key(NamedTuple):
    """One leaf option of the schema, as ``samft config keys`` shows it."""

    key: str
    type: str
    default: str
    help: str
    resumable: bool


def yaml_value(value: Any) -> str:
    """A value as a YAML config writes it, on one line: null, true, 0.0001, [qkv, proj], auto, 'null'."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_keys(section: Optional[str] = None, cls: type = Config) -> list[Key]:
    """Every leaf option (dotted key, type, default, help, resumable), in the schema's order; ``section``
    (``train``, ``peft.lora``, or one key) keeps those under it. An unknown section is a ConfigError with the
    nearest name."""
    rows = []
    for dotted, f, default in _leaves(cls):
        owner = _owner(cls, dotted)
        rows.append(Key(dotted, type_name(_hints(owner)[f.name]), yaml_value(default), f.metadata.get("help", ""),
                        bool(f.metadata.get("resumable"))))
    if not section:
        return rows
    section = section.strip(".")
    chosen = [r for r in rows if r.key == section or r.key.startswith(section + ".")]
    if not chosen:
        names = sorted({".".join(r.key.split(".")[:i]) for r in rows for i in range(1, r.key.count(".") + 2)})
        started = [n for n in names if n.startswith(section)]  # a name cut short: the names it begins
        near = started or difflib.get_close_matches(section, names, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown config section or key {section!r}{hint}; sections: "
                          f"{', '.join(f.name for f in fields(cls))}")
    return chosen


def _owner(cls: type, dotted: str) -> type:
    """The dataclass that declares the leaf ``dotted`` (``train.lr`` -> TrainConfig)."""
    for part in dotted.split(".")[:-1]:
        cls = _hints(cls)[part]
    return cls


def resumable_keys(cls: type = Config) -> tuple[str, ...]:
    """The options declared ``opt(..., resumable=True)``: what ``--resume RUN key=value`` may change."""
    return tuple(dotted for dotted, f, _ in _leaves(cls) if f.metadata.get("resumable"))


# what ``--resume RUN key=value`` may change: how long and how the run goes on, not what it learns
RESUMABLE_KEYS = resumable_keys()
