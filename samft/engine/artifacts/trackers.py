"""``trackers.json``: where the run's metrics go besides ``metrics.csv``, so that ``--resume`` continues the
same tracker run: ``{"format": ..., "mlflow": {"tracking_uri", "experiment_id", "run_id"}}``. Written
atomically when the MLflow run is created (before its first metric), read on resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samft.engine.artifacts.fileio import atomic_write_text, fail, field, read_json_file

KIND = "trackers_json"
FORMAT = "samft-trackers-1"
MLFLOW_KEYS = ("tracking_uri", "experiment_id", "run_id")
MAX_TEXT = 4096


def read(path: str | Path) -> dict[str, Any]:
    """The file, checked: a mapping; its ``mlflow`` entry (when present) names the store, experiment and run."""
    data = read_json_file(path, "trackers file")
    field(data, "format", str, path, default="")
    mlflow = field(data, "mlflow", dict, path, default=None)
    if mlflow is not None:
        for key in MLFLOW_KEYS:
            value = field(mlflow, key, str, path, "mlflow")
            if not 0 < len(value) <= MAX_TEXT:
                fail(path, f"field 'mlflow.{key}' is {len(value)} characters long, expected 1 to {MAX_TEXT}")
    return data


def write(path: str | Path, data: dict[str, Any]) -> None:
    import json

    atomic_write_text(path, json.dumps({**data, "format": FORMAT}, indent=1))
