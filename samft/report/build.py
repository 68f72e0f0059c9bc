"""``samft report``: one self-contained HTML page about one run or several side by side.

The page holds everything itself: figures (PNG) and example images (JPEG) as base64 ``data:`` URIs, its style inline,
and a Content-Security-Policy that lets it load nothing from anywhere (it opens from disk, offline). Every value
that comes from a run (config values, class names, set names, paths) goes through the template's autoescaping.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from samft.errors import SamftError
from samft.report import plots
from samft.report.analysis import SetAnalysis, analyse_set
from samft.report.runinfo import RunInfo, config_differences, labels_for, read_run
from samft.report.sections import overview_rows, run_details

GENERATOR = "samft report"  # the <meta name="generator"> that marks a page samft wrote
DEFAULT_K = 4
METRIC_TOLERANCE = 1e-6  # the predictions' metrics against eval.json's (same code, same data: equal)


def data_uri(image: bytes) -> str:
    """A ``data:`` URI of a PNG (the figures) or JPEG (the examples) file's bytes."""
    mime = "image/jpeg" if image[:3] == b"\xff\xd8\xff" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(image).decode("ascii")


@dataclass
class RunSet:
    """One run's view of one evaluated set."""

    label: str
    entry: dict
    missing: str = ""  # why the predictions' parts are not available
    note: str = ""  # the predictions score otherwise than eval.json says
    figures: list[tuple[str, str]] = field(default_factory=list)  # (title, data URI)
    per_class: list[tuple[str, Optional[float]]] = field(default_factory=list)
    ranking: str = ""
    worst: list[dict] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)


@dataclass
class SetSection:
    name: str
    columns: list[str]
    table: list[dict]  # per run: label, n_images, cells [(metric, value or None)]
    runs: list[RunSet]


def build_report(runs: list[str | Path], *, k: int = DEFAULT_K, predict: bool = True, device: str = "auto",
                 data: Optional[dict[str, str]] = None, show_progress: bool = True, title: str = "") -> str:
    """The report page (HTML text) of the run directories ``runs``, side by side.

    ``predict``: run each model on its evaluated sets (with a progress bar) for what ``eval.json`` does not store
    (precision-recall, confusion matrix, the examples); otherwise those parts say they are not available.
    ``data``: {set: path} for sets evaluated with ``samft eval --data`` (not in the run's config).
    """
    if not runs:
        raise SamftError("samft report needs at least one run directory")
    paths = [Path(r) for r in runs]
    infos = [read_run(p, label) for p, label in zip(paths, labels_for(paths))]
    try:
        sections = [_set_section(name, infos, k, predict, device, data or {}, show_progress)
                    for name in _set_names(infos)]
    finally:
        _LOADED.clear()  # the model is not kept once the page is made
    return render(infos, sections, title)


def _set_names(infos: list[RunInfo]) -> list[str]:
    names: dict[str, None] = {}
    for info in infos:
        if info.evaluation.ok:
            names.update(dict.fromkeys(info.evaluation.value["sets"]))
    return list(names)


def _set_section(name: str, infos: list[RunInfo], k: int, predict: bool, device: str, data: dict[str, str],
                 show_progress: bool) -> SetSection:
    holders = [i for i in infos if i.evaluation.ok and name in i.evaluation.value["sets"]]
    columns: dict[str, None] = {}
    for info in holders:
        columns.update(dict.fromkeys(info.evaluation.value["sets"][name]["metrics"]))
    table = [{"label": i.label, "n_images": i.evaluation.value["sets"][name]["n_images"],
              "cells": [(m, i.evaluation.value["sets"][name]["metrics"].get(m)) for m in columns]} for i in holders]
    views = [_run_set(info, name, k, predict, device, data, show_progress) for info in holders]
    return SetSection(name, list(columns), table, views)


def _run_set(info: RunInfo, name: str, k: int, predict: bool, device: str, data: dict[str, str],
             show_progress: bool) -> RunSet:
    entry = info.evaluation.value["sets"][name]
    view = RunSet(info.label, entry)
    per_class = entry.get("per_class_iou")
    if isinstance(per_class, dict) and per_class:
        view.per_class = [(str(c), v if isinstance(v, (int, float)) else None) for c, v in per_class.items()]
        view.figures.append(("IoU per class (eval.json)", data_uri(plots.class_iou(dict(view.per_class)))))
    stored = info.per_image.get(name)
    if not predict:
        view.missing = "the report ran without predicting (--no-predict); it predicts the set for these parts"
        if stored is not None and stored.ok:
            _from_stored(view, stored.value, entry, k)
        return view
    try:
        analysis = _analyse(info, name, k, device, data, show_progress)
    except SamftError as e:
        view.missing = str(e)
        if stored is not None and stored.ok:
            _from_stored(view, stored.value, entry, k)
        return view
    _from_analysis(view, analysis, entry, info)
    return view


_LOADED: dict[str, Any] = {}  # one model per run while a report is built


def _analyse(info: RunInfo, name: str, k: int, device: str, data: dict[str, str], show_progress: bool
             ) -> SetAnalysis:
    from samft.data.layouts import eval_sets
    from samft.engine.artifacts.loading import load_run
    from samft.engine.infer.evaluate import selection_metric, tiling_of
    from samft.engine.runtime import pick_device

    if info.cfg.data.test and name not in info.cfg.data.test and name not in data:
        raise SamftError(f"set {name!r} is not among the run's data.test sets (evaluated with samft eval --data?): "
                         f"pass --data {name}=PATH to predict it")
    sets = eval_sets(info.cfg.data, {name: data[name]} if name in data else None)
    if name not in sets:
        raise SamftError(f"set {name!r} is not among the run's sets ({', '.join(sets)}): pass --data {name}=PATH "
                         f"to predict it")
    dev = pick_device(device)
    key = str(info.path.resolve())
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load_run(info.path, dev)
    tiling = tiling_of(info.evaluation.value["sets"][name].get("scoring"))  # predicted as eval did: by tiles
    return analyse_set(_LOADED[key], name, sets[name], selection_metric(info.cfg), k, dev, show_progress, tiling)


def _from_stored(view: RunSet, rows: list[dict], entry: dict, k: int) -> None:
    """Without predictions: the distribution and the ranking from the per-image CSV ``samft eval`` wrote."""
    key = entry.get("sorted_by")
    if not rows or key not in rows[0]:
        return
    view.figures.append((f"{key} over the images (eval_per_image)",
                         data_uri(plots.distribution([r[key] for r in rows], key))))
    from samft.report.analysis import pick

    worst, best = pick(rows, key, k)
    view.ranking = key
    view.worst = [{"name": r["image"], "score": r[key]} for r in worst]
    view.best = [{"name": r["image"], "score": r[key]} for r in best]


def _from_analysis(view: RunSet, a: SetAnalysis, entry: dict, info: RunInfo) -> None:
    differ = [m for m, v in entry["metrics"].items()
              if m in a.metrics and not _close(v, a.metrics[m])]
    if differ:
        m = differ[0]
        view.note = (f"the run's predictions now score {m} = {a.metrics[m]:.6g}, eval.json says {entry['metrics'][m]:.6g}"
                     f" (the data, the adapter or the scoring changed since the evaluation; samft eval again)")
    if a.fg_hist is not None:
        view.figures.insert(0, ("precision-recall and threshold (predictions)",
                                data_uri(plots.precision_recall(a.fg_hist, a.bg_hist, info.cfg.eval.threshold))))
    if a.confusion is not None:
        view.figures.insert(0, ("confusion matrix (predictions)", data_uri(plots.confusion(a.confusion, a.class_names))))
    if a.rows:
        view.figures.append((f"{a.sorted_by} over the images (predictions)",
                             data_uri(plots.distribution([r[a.sorted_by] for r in a.rows], a.sorted_by))))
    view.ranking = a.sorted_by
    as_dict = lambda e: {"name": e.name, "score": e.score, "image": data_uri(e.image),  # noqa: E731
                         "truth": data_uri(e.truth), "prediction": data_uri(e.prediction)}
    view.worst, view.best = [as_dict(e) for e in a.worst], [as_dict(e) for e in a.best]


def _close(a: Any, b: Any) -> bool:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return True
    if a != a and b != b:  # both NaN
        return True
    return abs(float(a) - float(b)) <= METRIC_TOLERANCE * max(1.0, abs(float(a)))


def render(infos: list[RunInfo], sections: list[SetSection], title: str = "") -> str:
    """The page's HTML from the runs read and their sets' sections (jinja2, autoescaped)."""
    import jinja2

    from samft.version import __version__

    env = jinja2.Environment(loader=jinja2.PackageLoader("samft.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["sig"] = _sig
    metrics = [(i.label, i.metrics.value if i.metrics.ok else [], _metric_of(i)) for i in infos]
    curves = plots.curves(metrics)
    missing_curves = [(i.label, i.metrics.missing) for i in infos if not i.metrics.ok]
    return env.get_template("report.html.j2").render(
        title=title or "samft report: " + ", ".join(i.label for i in infos),
        generator=f"{GENERATOR} {__version__}", generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        runs=[run_details(i) for i in infos], overview=overview_rows(infos),
        differences=config_differences(infos) if len(infos) > 1 else [],
        curves=data_uri(curves) if curves else None, missing_curves=missing_curves, sets=sections)


def _metric_of(info: RunInfo) -> str:
    from samft.engine.infer.evaluate import selection_metric, tiling_of

    return selection_metric(info.cfg)


def _sig(value: Any) -> str:
    """4 significant digits (GMACs: 0.0004883 for a tiny encoder's block, 7.398 for ViT-B's)."""
    return f"{value:.4g}" if isinstance(value, (int, float)) else _num(value)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)
