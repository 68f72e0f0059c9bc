"""Evaluation at each image's original resolution (or at the input size, ``eval.resize_gt_to_input``), per named
test set, with the input geometry the model was trained with (``data.resize``) and the metric variants of the
config's protocol (``eval.miou``, ``eval.ber``: the task's metrics)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from samft import __version__
from samft.config import Config, config_hash
from samft.data.datasets import EvalDataset, collate
from samft.data.layouts import Pair, eval_sets
from samft.data.transforms import squash_mask
from samft.engine import distributed as D
from samft.engine.checkpoint import atomic_write_text
from samft.engine.runtime import autocast, pick_device, resolve_precision
from samft.engine.runs import ADAPTER_FILE, EVAL_FILE, load_run
from samft.metrics import BinaryMetrics, ConfusionMetrics
from samft.model.semantic import SegOutput, SemanticSAM, logits_to_original
from samft.progress import progress
from samft.tasks import Task, make_task


def image_scores(task: Task, out: SegOutput, j: int, img_size: int, valid_hw: list[int], size: list[int]
                 ) -> torch.Tensor:
    """Image ``j`` of a batch's outputs -> the task's per-pixel scores at ``size`` (padding cropped)."""
    logits = logits_to_original(out.masks[j], img_size, valid_hw, size)
    return task.scores(logits, None if out.class_logits is None else out.class_logits[j])


@torch.no_grad()
def iter_predictions(model: SemanticSAM, pairs: list[Pair], batch_size: int, device: torch.device, task: Task,
                     precision: str = "fp32", num_workers: int = 0, at_input_size: bool = False,
                     resize: str = "pad") -> Iterator[tuple[Pair, np.ndarray, Optional[np.ndarray]]]:
    """Yield (pair, scores, ground truth or None) at each image's original size.

    Binary models give the foreground probability (H, W); multi-class models the per-pixel class scores
    (C, H, W) of MaskFormer's inference (argmax = label map). ``at_input_size``: scores and ground truth
    at img_size x img_size instead (AutoGluon's protocol: the unpadded prediction and the ground truth
    both stretched to the square input, the ground truth nearest as PIL). ``resize``: the input geometry
    (``data.resize``: pad or squash), the one the model was trained with.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(EvalDataset(pairs, model.img_size, task.classes, resize), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate, generator=torch.Generator())
    try:
        for batch in loader:
            with autocast(device, precision):
                out = model(batch["image"].to(device, non_blocking=True))
            for j, index in enumerate(batch["index"].tolist()):
                size = [model.img_size] * 2 if at_input_size else batch["orig_hw"][j].tolist()
                scores = image_scores(task, out, j, model.img_size, batch["valid_hw"][j].tolist(), size)
                gt = batch["gt"][j]
                if at_input_size and gt is not None:
                    gt = squash_mask(gt, model.img_size)
                yield pairs[index], scores.cpu().numpy().astype(np.float32), gt
    finally:
        model.train(was_training)


def evaluate_pairs(model: SemanticSAM, pairs: list[Pair], cfg: Config, device: torch.device, precision: str,
                   description: str = "eval", show_progress: bool = True) -> BinaryMetrics | ConfusionMetrics:
    """The task's metrics of ``model`` on ``pairs``."""
    task = make_task(cfg)
    metrics = task.new_metrics()
    with progress(description, len(pairs), show_progress) as advance:
        for pair, scores, gt in iter_predictions(model, pairs, cfg.eval.batch_size, device, task, precision,
                                                 cfg.data.num_workers, cfg.eval.resize_gt_to_input, cfg.data.resize):
            task.update(metrics, scores, gt, pair.name)
            advance()
    return metrics


def evaluate_run(run_dir: str | Path, data: Optional[dict[str, str]] = None, device: str = "auto",
                 show_progress: bool = True, write: bool = True) -> dict:
    """Evaluate a run's best adapter on its test sets (or ``data``) and write ``eval.json``.

    Under ``torchrun`` each process evaluates its share of the images (each image once) and rank 0
    merges the per-image results and writes ``eval.json``; every rank returns the merged results.
    """
    owns_group = not D.is_initialized()
    info = D.setup(device)
    ok = False
    try:
        results = _evaluate_run(run_dir, data, D.device_for(info, pick_device(device)), show_progress, write, info)
        ok = True
        return results
    finally:
        if owns_group:
            D.cleanup(graceful=ok)


def _evaluate_run(run_dir: str | Path, data: Optional[dict[str, str]], dev: torch.device, show_progress: bool,
                  write: bool, info: D.DistInfo) -> dict:
    run = load_run(run_dir, dev)
    cfg = run.cfg
    precision = resolve_precision(cfg.train.precision, dev)
    sets = eval_sets(cfg.data, data)
    checkpoint = str(Path(run_dir) / ADAPTER_FILE)
    chash = config_hash(cfg)
    scoring = "input_size" if cfg.eval.resize_gt_to_input else "original_resolution"
    results: dict = {"samft_version": __version__, "run": str(run_dir), "checkpoint": checkpoint,
                     "config_hash": chash, "protocol": cfg.protocol, "scoring": scoring, "resize": cfg.data.resize,
                     "miou": cfg.eval.miou, "ber": cfg.eval.ber, "sets": {}}
    for name, pairs in sets.items():
        t0 = time.perf_counter()
        metrics = evaluate_pairs(run.model, D.shard(pairs, info), cfg, dev, precision, f"eval {name}",
                                 show_progress and info.is_main)
        metrics = D.merge_across(metrics, info)
        results["sets"][name] = {
            "n_images": len(metrics),
            "metrics": metrics.compute(),
            **metrics.extras(),
            "checkpoint": checkpoint,
            "config_hash": chash,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    if write and info.is_main:
        atomic_write_text(Path(run_dir) / EVAL_FILE, json.dumps(results, indent=2))
    D.barrier(info)
    return results
