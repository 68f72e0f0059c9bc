"""``eval.json`` (or ``MODEL.eval.json`` next to an exported model): one entry per evaluated set, merged
across evaluations (a set evaluated again replaces only its own entry).

:func:`update` reads, merges and writes under an exclusive lock on ``.eval.json.lock`` beside the file
(``.MODEL.eval.json.lock`` for an exported model), so two evaluations writing one file at once both keep
their sets; the lock is separate from a run's training lock (``.lock``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from samft.engine.artifacts.fileio import atomic_write_text, field, read_json_file
from samft.errors import SamftError
from samft.files import exclusive_lock

KIND = "eval_json"
FORMAT = "samft-eval-1"
MAX_SET_IMAGES = 10**9


def _check_set(path: Path, name: str, entry: object) -> None:
    where = f"sets.{name}"
    field({"e": entry}, "e", dict, path, where)  # names the set when it is not a mapping
    field(entry, "n_images", int, path, where, lo=0, hi=MAX_SET_IMAGES)
    metrics = field(entry, "metrics", dict, path, where)
    if entry.get("scoring") is not None:
        field(entry, "scoring", str, path, where)
    for key in metrics:
        field(metrics, key, (int, float), path, f"{where}.metrics", lo=-math.inf, hi=math.inf)


def read(path: str | Path) -> dict:
    """The results in ``path``, checked: a mapping with a ``sets`` mapping of {n_images, metrics} entries."""
    path = Path(path)
    data = read_json_file(path, "evaluation results")
    sets = field(data, "sets", dict, path)
    if data.get("scoring") is not None:
        field(data, "scoring", str, path)
    for name, entry in sets.items():
        _check_set(path, name, entry)
    return data


MIXED = "mixed: see each set's scoring"


def check_ours(path: str | Path) -> dict:
    """The results already in ``path`` ({} when there is none); a file there that is not samft's evaluation
    results (unreadable, damaged, or a user's file of that name) is refused in one line, before any evaluation
    runs and again under the lock: samft never replaces a file it cannot read as its own."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        return read(path)
    except SamftError as e:
        reason = str(e).split(": ", 1)[-1]
        raise SamftError(f"{path}: exists but is not samft's evaluation results ({reason}); samft never replaces it: "
                         f"move it away, then evaluate again") from None


def merge(path: Path, results: dict) -> dict:
    """``results`` merged into the results already in ``path``: a set evaluated again replaces only its own
    entry (each entry keeps the checkpoint, config hash and ``scoring`` it was made with: an entry of an
    earlier version without one takes its file's); other sets stay. The file-level ``scoring`` (for readers of
    earlier versions) is the sets' common one, or :data:`MIXED`. A file that is not samft's evaluation results is
    never replaced (:func:`check_ours`)."""
    old = check_ours(path)
    kept = {k: v for k, v in old.get("sets", {}).items() if k not in results["sets"]}
    for entry in kept.values():
        entry.setdefault("scoring", old.get("scoring"))
    for entry in results["sets"].values():
        entry.setdefault("scoring", results.get("scoring"))
    sets = {**kept, **results["sets"]}
    scorings = {entry["scoring"] for entry in sets.values()}
    return {**results, "scoring": scorings.pop() if len(scorings) == 1 else MIXED, "sets": sets}


def write(path: str | Path, results: dict) -> None:
    """Write ``results`` (already merged) atomically."""
    atomic_write_text(path, json.dumps(results, indent=2))


def lock_path(path: str | Path) -> Path:
    """The lock file of ``path``'s read-merge-write: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def update(path: str | Path, results: dict) -> dict:
    """Merge ``results`` into ``path`` (:func:`merge`) and write it, all under the file's exclusive lock
    (:func:`lock_path`): a concurrent evaluation waits, then merges into what this one wrote. Returns the
    merged results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock_path(path)):
        merged = merge(path, results)
        write(path, merged)
    return merged
