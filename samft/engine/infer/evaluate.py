"""Evaluation at each image's original resolution (or at the input size, ``eval.resize_gt_to_input``), per named
test set, with the input geometry the model was trained with (``data.resize``) and the metric variants of the
config's protocol (``eval.miou``, ``eval.ber``: the task's metrics)."""

from __future__ import annotations

import time
import warnings
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from samft.version import __version__
from samft.config import Config, config_hash
from samft.data.workers import cap_workers, prefetched, surfaced
from samft.data.datasets import EvalDataset, collate
from samft.data.layouts import Pair, eval_sets
from samft.data.transforms import squash_mask
from samft.engine import distributed as D
from samft.engine.artifacts import eval_json, per_image_csv, split_file
from samft.engine.runtime import autocast, memory_advice, resolve_precision
from samft.engine.artifacts.rundir import ADAPTER_FILE, RunDir
from samft.engine.artifacts.loading import load_run, run_device
from samft.engine.infer.per_image import write_per_image
from samft.engine.infer.tiling import check_tiling, inference_memory, iter_tiled_predictions
from samft.errors import SamftError
from samft.tasks.metrics import BinaryMetrics, ConfusionMetrics, for_every_image
from samft.model.semantic import SemanticSAM, image_scores
from samft.progress import progress
from samft.tasks.task import Task, make_task


def _scores_array(task: Task, out, j: int, img_size: int, valid_hw: list[int], size: list[int]) -> np.ndarray:
    """Image ``j`` of a batch's outputs as the task's float32 scores at ``size`` (:func:`image_scores`)."""
    with torch.no_grad():  # grad mode is per thread: a writer thread computes these too (``deferred``)
        return image_scores(task, out, j, img_size, valid_hw, size).cpu().numpy().astype(np.float32, copy=False)


@torch.no_grad()
def iter_predictions(model: SemanticSAM, pairs: list[Pair], batch_size: int, device: torch.device, task: Task,
                     precision: str = "fp32", num_workers: int = 0, at_input_size: bool = False,
                     resize: str = "pad", workers_option: Optional[str] = "data.num_workers", deferred: bool = False
                     ) -> Iterator[tuple[Pair, np.ndarray, Optional[np.ndarray]]]:
    """Yield (pair, scores, ground truth or None) at each image's original size.

    Binary models give the foreground probability (H, W); multi-class models the per-pixel class scores
    (C, H, W) of MaskFormer's inference (argmax = label map). ``at_input_size``: scores and ground truth
    at img_size x img_size instead (AutoGluon's protocol: the unpadded prediction and the ground truth
    both stretched to the square input, the ground truth nearest as PIL). ``resize``: the input geometry
    (``data.resize``: pad or squash), the one the model was trained with. ``num_workers`` is capped by the CPUs
    and the batches (:func:`samft.data.workers.cap_workers`; ``workers_option`` names where it came from).
    ``deferred``: yield, in place of the scores, a function of no argument that computes them (the same
    array), so that a writer thread resizes them while the model computes the next batch (``samft predict``).
    """
    was_training = model.training
    model.eval()
    workers = cap_workers(num_workers, len(pairs), batch_size, workers_option)
    loader = DataLoader(EvalDataset(pairs, model.img_size, task.classes, resize), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate, generator=torch.Generator())
    batches = surfaced(loader) if workers else prefetched(loader)  # no loader process: a thread reads ahead
    try:
        for batch in batches:  # a bad mask in a worker is its one line, not the worker's traceback
            with autocast(device, precision):
                out = model(batch["image"].to(device, non_blocking=True))
            for j, index in enumerate(batch["index"].tolist()):
                size = [model.img_size] * 2 if at_input_size else batch["orig_hw"][j].tolist()
                scores = partial(_scores_array, task, out, j, model.img_size, batch["valid_hw"][j].tolist(), size)
                gt = batch["gt"][j]
                if at_input_size and gt is not None:
                    gt = squash_mask(gt, model.img_size)
                yield pairs[index], scores if deferred else scores(), gt
    finally:
        batches.close()  # a consumer that stopped early stops the read-ahead thread too
        model.train(was_training)


def predictions(model: SemanticSAM, pairs: list[Pair], cfg: Config, device: torch.device, task: Task,
                precision: str, tiling: Optional[tuple[int, Optional[int]]] = None, num_workers: Optional[int] = None,
                workers_option: Optional[str] = "data.num_workers", at_input_size: Optional[bool] = None,
                deferred: bool = False) -> Iterator[tuple[Pair, np.ndarray, Optional[np.ndarray]]]:
    """The predictions evaluation scores: :func:`iter_predictions` with the run's settings, or by tiles at native
    resolution with ``tiling`` = (tile, overlap or None) (:func:`samft.engine.infer.tiling.iter_tiled_predictions`).
    ``num_workers`` None: ``data.num_workers``; ``at_input_size`` None: ``eval.resize_gt_to_input`` (prediction
    passes False: masks at each image's own size). ``deferred``: functions that compute the scores in their place
    (:func:`iter_predictions`)."""
    if tiling:
        tiled = iter_tiled_predictions(model, pairs, tiling[0], tiling[1], cfg.eval.batch_size, device, task, precision)
        return ((pair, partial(_identity, scores), gt) for pair, scores, gt in tiled) if deferred else tiled
    workers = cfg.data.num_workers if num_workers is None else num_workers
    at_input_size = cfg.eval.resize_gt_to_input if at_input_size is None else at_input_size
    return iter_predictions(model, pairs, cfg.eval.batch_size, device, task, precision, workers, at_input_size,
                            cfg.data.resize, workers_option, deferred)


def _identity(value):
    return value


TILED_SCORING = "original_resolution, tiles {} px overlapping {} px"  # eval.json's scoring of a tiled evaluation


def scoring_name(at_input_size: bool, tiling: Optional[tuple[int, int]] = None) -> str:
    """eval.json's ``scoring``: how the predictions were scored (tiles named with their size and overlap)."""
    if tiling:
        return TILED_SCORING.format(*tiling)
    return "input_size" if at_input_size else "original_resolution"


def tiling_of(scoring: object) -> Optional[tuple[int, int]]:
    """The (tile, overlap) an eval.json ``scoring`` records (:func:`scoring_name`); None for whole images."""
    import re

    pattern = re.escape(TILED_SCORING).replace(re.escape("{}"), "([0-9]+)")
    found = re.fullmatch(pattern, scoring) if isinstance(scoring, str) else None
    return (int(found.group(1)), int(found.group(2))) if found else None


def evaluate_pairs(model: SemanticSAM, pairs: list[Pair], cfg: Config, device: torch.device, precision: str,
                   description: str = "eval", show_progress: bool = True, tile: Optional[int] = None,
                   overlap: Optional[int] = None, workers_option: Optional[str] = "data.num_workers"
                   ) -> BinaryMetrics | ConfusionMetrics:
    """The task's metrics of ``model`` on ``pairs``; ``tile``: predict by tiles at native resolution
    (``samft.engine.infer.tiling``; ``overlap`` None = default)."""
    task = make_task(cfg)
    metrics = task.new_metrics()
    source = predictions(model, pairs, cfg, device, task, precision, (tile, overlap) if tile else None,
                         workers_option=workers_option)
    with progress(description, len(pairs), show_progress) as advance:
        for pair, scores, gt in source:
            task.update(metrics, scores, gt, pair.name)
            advance()
    return metrics


def evaluate_run(run_dir: str | Path, data: Optional[dict[str, str]] = None, device: str = "auto",
                 show_progress: bool = True, write: bool = True, tile: Optional[int] = None,
                 overlap: Optional[int] = None) -> dict:
    """Evaluate a run's best adapter on its test sets (or ``data``) and write ``eval.json``.

    ``tile``/``overlap``: predict each image by tiles at native resolution (the protocol names them).

    Each set's per-image results go to ``eval_per_image/<set>.csv`` beside ``eval.json``
    (:mod:`samft.engine.infer.per_image`); its entry names the file and holds the worst images. Returns
    ``eval.json`` as written: the sets evaluated now merged with those of earlier evaluations (``write``
    False: this evaluation's sets only).

    Under ``torchrun`` each process evaluates its share of the images (each image once) and rank 0
    merges the per-image results and writes ``eval.json``; rank 0 returns the merged file, the other
    ranks this evaluation's results.
    """
    with D.distributed(device) as info, memory_advice(*inference_memory(tile)):
        overlap = check_tiling(tile, overlap)
        tiling = (tile, overlap) if tile is not None else None
        return _evaluate_run(run_dir, data, D.device_for(info, run_device(run_dir, device)), show_progress, write, info,
                             tiling)


def _say_degenerate(name: str, kind: Optional[str], info: D.DistInfo) -> None:
    """One warning when a set's predictions are all empty, all foreground, one class, or collapsed to one."""
    if kind and info.is_main:
        warnings.warn(f"eval {name}: the predictions are {for_every_image(kind)}: the model has not learnt this set's masks",
                      stacklevel=3)


def _training_images(run_dir: str | Path) -> set[Path]:
    """The resolved images of a run's training split (``split.json``; none for an exported model file)."""
    run = RunDir(run_dir)
    if Path(run_dir).is_file() or not run.split_path.is_file():
        return set()
    listed = split_file.read(run.split_path)
    return {Path(img).resolve() for img, _ in listed.get("train", [])}


def _say_overlap(sets: dict[str, list[Pair]], train: set[Path], info: D.DistInfo) -> None:
    """Scoring images the run trained on is not a test: say how many each set shares with the training split."""
    for name, pairs in sets.items():
        shared = sum(p.image.resolve() in train for p in pairs)
        if shared and info.is_main:
            warnings.warn(f"eval {name}: {shared} of its {len(pairs)} images are in the run's training split "
                          f"(split.json): those scores measure memory, not generalisation", stacklevel=3)


def selection_metric(cfg: Config) -> str:
    """The metric the per-image results are sorted by: the run's ``train.metric`` (the task's default when it
    is not one of the task's)."""
    task = make_task(cfg)
    name = task.selection_metric(cfg.train.metric)
    return name if name in task.metric_names else task.default_metric


def _evaluate_run(run_dir: str | Path, data: Optional[dict[str, str]], dev: torch.device, show_progress: bool,
                  write: bool, info: D.DistInfo, tiling: Optional[tuple[int, int]] = None) -> dict:
    run = load_run(run_dir, dev)
    cfg = run.cfg
    if tiling and cfg.eval.resize_gt_to_input:
        raise SamftError("--tile scores at native resolution; the run's eval.resize_gt_to_input=true scores at the "
                         "input size: drop one of them")
    precision = resolve_precision(cfg.train.precision, dev)
    sets = eval_sets(cfg.data, data)
    _say_overlap(sets, _training_images(run_dir), info)
    if write:  # what samft would not replace is said before any scoring
        eval_json.check_ours(RunDir(run_dir).eval_path)
        per_image_csv.check_folder(RunDir(run_dir).per_image_dir)
    exported = Path(run_dir).is_file()  # an exported model file: results go next to it
    checkpoint = str(run_dir) if exported else str(Path(run_dir) / ADAPTER_FILE)
    chash = config_hash(cfg)
    scoring = scoring_name(cfg.eval.resize_gt_to_input, tiling)
    results: dict = {"samft_version": __version__, "run": str(run_dir), "checkpoint": checkpoint,
                     "config_hash": chash, "protocol": cfg.protocol, "scoring": scoring, "resize": cfg.data.resize,
                     "miou": cfg.eval.miou, "ber": cfg.eval.ber, "evaluated": round(time.time(), 3), "sets": {}}
    target = RunDir(run_dir)  # RUN/eval.json, or MODEL.eval.json next to an exported model
    for name, pairs in sets.items():
        t0 = time.perf_counter()
        metrics = evaluate_pairs(run.model, D.shard(pairs, info), cfg, dev, precision, f"eval {name}",
                                 show_progress and info.is_main, *(tiling or ()))
        metrics = D.merge_across(metrics, info)
        _say_degenerate(name, metrics.degenerate(), info)
        results["sets"][name] = {
            "n_images": len(metrics),
            "metrics": metrics.compute(),
            **metrics.extras(),
            "checkpoint": checkpoint,
            "config_hash": chash,
            "scoring": scoring,
            "evaluated": results["evaluated"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if write and info.is_main:
            results["sets"][name].update(write_per_image(target.per_image_dir, target.eval_path, name, metrics,
                                                         pairs, selection_metric(cfg)))
    if write and info.is_main:
        results = eval_json.update(target.eval_path, results)  # read-merge-write under the file's lock
    D.barrier(info)
    return results

