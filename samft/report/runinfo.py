"""What a report says about one run, read from its directory through each file kind's own reader.

``config.yaml`` is the run: without it (or when it is damaged) there is nothing to report, and that is one line
naming the file (:class:`~samft.errors.SamftError`). Every other file feeds one section: when it is missing or
damaged, that section says ``not available: <why>`` (the reader's one line) and the rest of the page is made.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from samft.config import Config, dump_yaml
from samft.engine.artifacts import adapter, eval_json, metrics_csv, per_image_csv, prune_files, resumes, split_file
from samft.engine.artifacts.rundir import (ADAPTER_FILE, ARCH_FILE, METRICS_FILE, RESUMES_FILE, SPLIT_FILE,
                                           RunDir)
from samft.errors import SamftError


@dataclass
class Part:
    """A section's content, or why it is not available."""

    value: Any = None
    missing: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing


def read_part(reader, path: Path, absent: str = "") -> Part:
    """``reader(path)`` as a :class:`Part`: a missing file says ``absent`` (default: the file was not found), a
    damaged one the reader's own line."""
    if not path.is_file() and absent:
        return Part(missing=absent)
    try:
        return Part(reader(path))
    except SamftError as e:
        return Part(missing=str(e))


@dataclass
class RunInfo:
    """One run directory, read."""

    path: Path
    label: str
    cfg: Config
    config_yaml: str
    metrics: Part
    evaluation: Part
    split: Part
    resumes: Part
    adapter_meta: Part
    architecture: Part
    model: Part  # samft.model.describe: counts, attention, a pruned encoder's blocks and GMACs
    per_image: dict[str, Part] = field(default_factory=dict)


def read_run(path: str | Path, label: str = "") -> RunInfo:
    """Read the run at ``path``: a SamftError naming ``config.yaml`` when it is not a run, else every section."""
    run = RunDir(path)
    if run.exported:
        raise SamftError(f"{path}: an exported model file; samft report reads run directories (the folder "
                         f"samft train wrote)")
    cfg = run.read_config()
    info = RunInfo(
        path=run.path, label=label or run.path.name, cfg=cfg, config_yaml=dump_yaml(cfg),
        metrics=read_part(metrics_csv.read, run.metrics_path),
        evaluation=read_part(eval_json.read, run.eval_path,
                             absent=f"{run.eval_path.name} not found: not evaluated yet (samft eval --run {path})"),
        split=read_part(split_file.read, run.file(SPLIT_FILE), absent=f"{SPLIT_FILE} not found"),
        resumes=read_part(resumes.read, run.file(RESUMES_FILE), absent="never resumed with a changed config"),
        adapter_meta=read_part(adapter.read_metadata, run.file(ADAPTER_FILE)),
        architecture=read_part(prune_files.read_architecture, run.file(ARCH_FILE), absent="not a pruned run"),
        model=_describe(run, cfg),
    )
    if info.evaluation.ok:
        for name, entry in info.evaluation.value["sets"].items():
            info.per_image[name] = _per_image(run, name, entry)
    return info


def _describe(run: RunDir, cfg: Config) -> Part:
    """The model's structure (``samft info``'s numbers), built without weights."""
    import copy

    from samft.engine.artifacts.loading import locate_pruned
    from samft.model import describe

    try:
        cfg = copy.deepcopy(cfg)
        locate_pruned(run.path, cfg)
        return Part(describe(cfg))
    except (SamftError, OSError, ValueError) as e:
        return Part(missing=f"the model of {run.config_path} cannot be built ({e})")


def _per_image(run: RunDir, name: str, entry: dict) -> Part:
    relative = entry.get("per_image")
    if not isinstance(relative, str):
        return Part(missing=f"{run.eval_path.name}: set {name!r} records no per-image results (an earlier samft "
                            f"version's evaluation: evaluate it again)")
    path = (run.eval_path.parent / relative)
    if run.per_image_dir.resolve() not in path.resolve().parents:
        return Part(missing=f"{run.eval_path}: sets.{name}.per_image {relative!r} is outside {run.per_image_dir.name}/")
    return read_part(per_image_csv.read, path, absent=f"{path} not found")


# --- numbers shown in the overview ---------------------------------------------------------------------


def step_seconds(rows: list[dict]) -> Optional[float]:
    """The median seconds per optimizer step over the logging windows of ``metrics.csv`` (each step row holds
    its window's seconds since the previous row)."""
    per_step, last = [], 0
    for row in rows:
        if row["kind"] != "step":
            continue
        step = int(float(row["step"]))
        if row.get("seconds") and step > last:
            per_step.append(float(row["seconds"]) / (step - last))
        last = step
    return statistics.median(per_step) if per_step else None


def progress_done(rows: list[dict]) -> dict[str, Optional[int]]:
    """The last step and epoch ``metrics.csv`` records."""
    steps = [int(float(r["step"])) for r in rows if r.get("step")]
    epochs = [int(float(r["epoch"])) for r in rows if r["kind"] == "epoch" and r.get("epoch")]
    return {"steps": max(steps) if steps else None, "epochs": max(epochs) if epochs else None}


def split_sizes(split: dict) -> dict[str, int]:
    return {name: len(pairs) for name, pairs in split.items() if isinstance(pairs, list)}


def config_differences(runs: list[RunInfo]) -> list[tuple[str, list[str]]]:
    """The config keys whose values differ between the runs (``output.*`` aside): [(key, [value per run])]."""
    from samft.config import flat_dict, to_dict

    flats = [flat_dict(to_dict(r.cfg)) for r in runs]
    keys = sorted(set().union(*flats))
    return [(k, [_short(f.get(k, "—")) for f in flats]) for k in keys
            if not k.startswith("output.") and len({repr(f.get(k)) for f in flats}) > 1]


def _short(value: Any, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + " …"


def labels_for(paths: list[Path]) -> list[str]:
    """A short, distinct label per run: its folder name, with its parents' names where two would be equal."""
    depth = 1
    while depth < 6:
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return [f"{n + 1}: {p}" for n, p in enumerate(paths)]
