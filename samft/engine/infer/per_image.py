"""Per-image results of an evaluated set: each image's metrics (from the accumulator's own per-image records,
nothing recomputed), sorted worst first by the run's selection metric (``train.metric``), written to
``eval_per_image/<set>.csv`` (:mod:`samft.engine.artifacts.per_image_csv`); the worst few go into the set's
``eval.json`` entry for the command line's summary."""

from __future__ import annotations

import math
from pathlib import Path

from samft.data.layouts import Pair
from samft.engine.artifacts import per_image_csv
from samft.tasks.metrics import BinaryMetrics, ConfusionMetrics, at_threshold, base_name, higher_is_better

BINARY_COLUMNS = ("dice@0.5", "iou@0.5", "Sm", "MAE")
MULTICLASS_COLUMNS = ("mIoU", "pixel_acc")
WORST = 3


def per_image_rows(metrics: BinaryMetrics | ConfusionMetrics, pairs: list[Pair], selection: str
                   ) -> tuple[list[dict], list[str], str]:
    """(rows worst first, metric columns, the sort column). Binary columns: dice and IoU at the set's threshold
    (named after it: ``dice@0.3``), S-measure, MAE; multi-class: mIoU over the classes present in the image and
    pixel accuracy; the selection metric first (added when not among them). NaN sorts last."""
    binary = isinstance(metrics, BinaryMetrics)
    core = BINARY_COLUMNS if binary else MULTICLASS_COLUMNS
    selection = base_name(selection) if binary else selection  # the records' names are those at 0.5
    names = [selection, *(c for c in core if c != selection)]
    paths = {p.name: p.image for p in pairs}
    rows = []
    for record in metrics.per_image():
        values = {n: record[n] for n in names}
        if binary:
            values = at_threshold(values, metrics.threshold)
        image = paths.get(record["name"])
        rows.append({"image": image.name if image else record["name"], "path": str(image or ""), **values})
    columns = list(rows[0])[2:] if rows else names
    key, sign = columns[0], 1.0 if higher_is_better(selection) else -1.0
    rows.sort(key=lambda r: (math.isnan(r[key]), sign * r[key] if not math.isnan(r[key]) else 0.0, r["image"]))
    return rows, columns, key


def write_per_image(folder: Path, eval_file: Path, set_name: str, metrics: BinaryMetrics | ConfusionMetrics,
                    pairs: list[Pair], selection: str) -> dict:
    """Write the set's CSV into ``folder`` (beside ``eval_file``); returns what its ``eval.json`` entry records:
    ``per_image`` (the CSV's path relative to eval.json's folder), ``sorted_by`` and the ``worst`` rows."""
    rows, columns, key = per_image_rows(metrics, pairs, selection)
    target = per_image_csv.prepare_folder(folder) / per_image_csv.set_file_name(set_name)
    per_image_csv.write(target, rows, columns)
    worst = [{"image": r["image"], key: (None if math.isnan(r[key]) else r[key])} for r in rows[:WORST]]
    return {"per_image": str(target.relative_to(eval_file.parent)), "sorted_by": key, "worst": worst}
