"""The config written out: a plain mapping, its YAML (a run's ``config.yaml``) and its hash; the field table
(``samft info``, docs) and the keys ``--resume`` may change, both read from the schema."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import fields, is_dataclass

import yaml

from samft.config.root import Config


def to_dict(cfg: Config) -> dict:
    """Plain mapping of the config; ``peft`` keeps only the active method's section."""
    out = dataclasses.asdict(cfg)
    out["peft"] = {"method": cfg.peft.method, cfg.peft.method: out["peft"][cfg.peft.method]}
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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


def resumable_keys(cls: type = Config) -> tuple[str, ...]:
    """The options declared ``opt(..., resumable=True)``: what ``--resume RUN key=value`` may change."""
    return tuple(dotted for dotted, f, _ in _leaves(cls) if f.metadata.get("resumable"))


# what ``--resume RUN key=value`` may change: how long and how the run goes on, not what it learns
RESUMABLE_KEYS = resumable_keys()
