"""What a report needs from a set that ``eval.json`` does not store: the run's predictions on it.

One pass over the set with the evaluation's own code (:func:`samft.engine.infer.evaluate.predictions`, by the same
tiles when ``samft eval --tile`` scored the set, and the task's metrics accumulator: what wrote ``eval.json``),
with a progress bar, collects

- binary: the pooled pixel counts of foreground and background per probability bin (the precision-recall and
  threshold curves);
- multi-class: the confusion matrix;
- the per-image results, ranked as ``samft eval`` ranks them (:func:`samft.engine.infer.per_image.per_image_rows`);

then a second, short pass predicts the worst and best ``k`` images again and draws image / truth / prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from samft.data.layouts import Pair

BINS = 1000  # probability bins of the pixel histograms: thresholds 0, 0.001, ..., 0.999
THUMB = 192  # the longest side of a drawn example, in pixels
THUMB_QUALITY = 85  # its JPEG quality: a photo's 192 px thumbnail is ~1/6 of its PNG (~8 KB, not ~47 KB)


@dataclass
class Example:
    """One drawn example: its name, its score by the ranking metric, and three JPEG files (image, truth and
    prediction overlays)."""

    name: str
    score: float
    image: bytes
    truth: bytes
    prediction: bytes


@dataclass
class SetAnalysis:
    """The run's predictions on one set, summarised."""

    metrics: dict[str, float]  # the accumulator's compute(): what eval.json's entry should hold
    rows: list[dict]  # per image, worst first
    sorted_by: str
    fg_hist: Optional[np.ndarray] = None  # binary: foreground pixels per probability bin
    bg_hist: Optional[np.ndarray] = None
    confusion: Optional[np.ndarray] = None  # multi-class: rows truth, columns prediction
    class_names: tuple[str, ...] = ()
    worst: list[Example] = field(default_factory=list)
    best: list[Example] = field(default_factory=list)


def pixel_histograms(prob: np.ndarray, gt: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background pixel counts per probability bin (bin i holds [i/bins, (i+1)/bins); 1.0 the
    last): the counts above a threshold t = i/bins are the sums from bin i on, as ``prob >= t`` counts them."""
    index = np.clip(np.floor(prob.astype(np.float64) * bins), 0, bins - 1).astype(np.int64)
    gt = gt.astype(bool)
    return (np.bincount(index[gt], minlength=bins), np.bincount(index[~gt], minlength=bins))


def analyse_set(loaded, name: str, pairs: list[Pair], selection: str, k: int, device, show_progress: bool = True,
                tiling: Optional[tuple[int, int]] = None) -> SetAnalysis:
    """Predict ``pairs`` with the loaded run (:class:`samft.engine.artifacts.loading.LoadedRun`) and summarise;
    ``tiling``: (tile, overlap) as the set's evaluation predicted it (``samft eval --tile``), else whole images."""
    from samft.engine.infer.evaluate import predictions
    from samft.engine.infer.per_image import per_image_rows
    from samft.engine.runtime import resolve_precision
    from samft.progress import progress
    from samft.tasks.task import make_task

    cfg = loaded.cfg
    task = make_task(cfg)
    precision = resolve_precision(cfg.train.precision, device)
    metrics = task.new_metrics()
    binary = task.kind == "binary"
    fg, bg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    source = predictions(loaded.model, pairs, cfg, device, task, precision, tiling)
    with progress(f"report {name}", len(pairs), show_progress) as advance:
        for pair, scores, gt in source:
            task.update(metrics, scores, gt, pair.name)
            if binary:
                f, b = pixel_histograms(scores, gt)
                fg += f
                bg += b
            advance()
    rows, _, key = per_image_rows(metrics, pairs, selection)
    result = SetAnalysis(metrics.compute(), rows, key)
    if binary:
        result.fg_hist, result.bg_hist = fg, bg
    else:
        result.confusion, result.class_names = metrics.matrix.copy(), tuple(metrics.class_names)
    result.worst, result.best = draw_examples(loaded, task, pairs, rows, key, k, device, precision, tiling)
    return result


def pick(rows: list[dict], key: str, k: int) -> tuple[list[dict], list[dict]]:
    """The ``k`` worst rows (the first, ``rows`` being worst first) and the ``k`` best (the last, best first),
    without an image in both; rows whose score is NaN are in neither."""
    scored = [r for r in rows if not np.isnan(r[key])]
    worst = scored[:k]
    best = scored[len(worst):][-k:][::-1]
    return worst, best


def draw_examples(loaded, task, pairs: list[Pair], rows: list[dict], key: str, k: int, device, precision: str,
                  tiling: Optional[tuple[int, int]] = None) -> tuple[list[Example], list[Example]]:
    """Predict the worst and best ``k`` images again (as the set was predicted: ``tiling``) and draw each as
    image, truth and prediction overlays."""
    from samft.engine.infer.evaluate import predictions

    worst, best = pick(rows, key, k)
    by_path = {str(p.image): p for p in pairs}
    chosen = [by_path[r["path"]] for r in worst + best if r["path"] in by_path]
    if not chosen:
        return [], []
    cfg = loaded.cfg
    drawn = {}
    at_input_size = cfg.eval.resize_gt_to_input and not tiling  # tiles score at native resolution
    for pair, scores, gt in predictions(loaded.model, chosen, cfg, device, task, precision, tiling, num_workers=0):
        drawn[str(pair.image)] = _draw(pair, task, scores, gt, at_input_size, loaded.model.img_size)
    as_example = lambda r: Example(r["image"], float(r[key]), *drawn[r["path"]])  # noqa: E731
    return ([as_example(r) for r in worst if r["path"] in drawn], [as_example(r) for r in best if r["path"] in drawn])


def _draw(pair: Pair, task, scores: np.ndarray, gt: np.ndarray, at_input_size: bool, size: int
          ) -> tuple[bytes, bytes, bytes]:
    from PIL import Image

    from samft.data.draw import class_overlay, jpeg_bytes, overlay
    from samft.data.io import read_image

    image = read_image(pair.image)
    if at_input_size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    pred = task.labels(scores)
    if task.classes is None:
        views = [image, overlay(image, gt.astype(bool)), overlay(image, pred)]
    else:
        truth = np.where(gt == task.classes.ignore_index, pred, gt).astype(np.int64)  # ignored pixels: as predicted
        views = [image, class_overlay(image, truth, task.classes), class_overlay(image, pred, task.classes)]
    return tuple(jpeg_bytes(_thumb(v), THUMB_QUALITY) for v in views)


def _thumb(view) -> "Image.Image":  # noqa: F821
    from PIL import Image

    im = view if isinstance(view, Image.Image) else Image.fromarray(view)
    scale = THUMB / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return im
