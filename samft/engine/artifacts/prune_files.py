"""A pruned run's JSON files: ``architecture.json`` (the architecture plus what the search found) and
``prune.json`` (the search history and the validation metrics). The pruned model file and the search
state are read by :mod:`samft.prune.state` and :mod:`samft.prune.search_state` (below the engine)."""

from __future__ import annotations

import json
from pathlib import Path

from samft.engine.artifacts.fileio import atomic_write_text, field, read_json_file

KIND = "prune_json"
FORMAT = "samft-prune-json-1"


def read_architecture(path: str | Path) -> dict:
    """``architecture.json``: a mapping whose ``architecture`` is a mapping with a ``blocks`` list."""
    data = read_json_file(path, "architecture file")
    arch = field(data, "architecture", dict, path)
    field(arch, "blocks", list, path, "architecture")
    for key in ("dense_gmacs", "target_gmacs", "pruned_gmacs"):
        field(data, key, (int, float), path, default=0.0, lo=0)
    return data


def read_report(path: str | Path) -> dict:
    """``prune.json``: a mapping with the ``metrics`` of the source and the pruned model."""
    data = read_json_file(path, "pruning report")
    field(data, "metrics", dict, path)
    field(data, "history", list, path, default=[])
    return data


def write(path: str | Path, data: dict) -> None:
    """Write either file atomically (numbers that are numpy/tensor scalars as floats)."""
    atomic_write_text(path, json.dumps(data, indent=1, default=float))


read = read_report
