"""Tasks: what a segmentation problem means, in one object per kind.

A task owns everything that differs between binary and multi-class segmentation, so the model, the
training loop, evaluation and prediction never branch on it:

- the model's shape: ``num_queries`` mask tokens and ``num_classes`` for the class head (binary: one query,
  no class head);
- the loss on a batch (binary: structure loss; multi-class: MaskFormer's matched set loss);
- post-processing: per-pixel scores from the decoder's outputs (binary: the foreground probability
  (H, W); multi-class: MaskFormer's class scores (C, H, W)) and the label map from them;
- the metrics accumulator and how a prediction updates it, the metric names, the default selection
  metric and the default weight of Conv-LoRA's balance loss (1.0 binary, 2.0 multi-class: the paper's);

:func:`make_task` builds the task of a config. :class:`~samft.data.classes.ClassSpec` (class names, colours,
ignore id) lives in the data layer, which decodes masks with it; drawing and PNG encoding are ``samft.data.draw``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from samft.data.classes import ClassSpec
from samft.tasks.losses import PointSampling, SetLossWeights, set_loss, structure_loss
from samft.tasks.metrics import (BINARY_METRICS, MULTICLASS_METRICS, BinaryMetrics, ConfusionMetrics, at_threshold_name,
                                 canonical)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, Q, h, w) logits to ``size``."""
    return torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def semantic_probs(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """MaskFormer's semantic inference: per-pixel class scores ``sum_q softmax(class_q)[:C] * sigmoid(mask_q)``.

    class_logits (..., Q, C+1), mask_logits (..., Q, H, W) -> (..., C, H, W); the label map is the argmax.
    """
    classes = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("...qc,...qhw->...chw", classes, mask_logits.float().sigmoid())


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A UserWarning shown once per process (the task is built by training, eval and predict alike)."""
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings

        warnings.warn(message, stacklevel=3)


@dataclass(frozen=True)
class LabelMap:
    """A prediction already decided: class ids (H, W). Tiled multi-class prediction hands this over instead
    of the C x H x W scores (:meth:`Task.labels` and :meth:`Task.update` take either)."""

    labels: np.ndarray


class Task:
    """The interface; see the module docstring. Built by :func:`make_task`."""

    kind = ""
    classes: Optional[ClassSpec] = None
    num_queries = 1
    num_classes = 1  # the model's class head: 1 = none (binary)
    metric_names: tuple[str, ...] = ()
    plot_metrics: tuple[str, ...] = ()  # drawn in curves.png (with the selection metric)
    default_metric = ""
    default_balance_weight = 1.0
    extra_hints = "more train.epochs or a larger model.img_size"
    decides_in_bands = False  # whether tiled prediction may hand over a LabelMap instead of the scores

    def learning_hints(self, lr: float) -> str:
        """What to try when a run learns nothing, from the run's own learning rate (``train.lr``)."""
        if lr < 3e-4:
            higher = f"a higher train.lr (now {lr:g}; e.g. 3e-4 to 1e-3)"
        else:
            higher = f"a higher train.lr (now {lr:g}; e.g. {min(3 * lr, 1e-2):g}) in a new run"
        return f"Try {higher}, {self.extra_hints}."

    def selection_metric(self, metric: str) -> str:
        """The eval.json name of ``train.metric`` (``auto`` = the task's default)."""
        return self.default_metric if metric == "auto" else canonical(metric)

    def aux_weight(self, name: str, configured: Optional[float]) -> float:
        """Weight of a named auxiliary loss: the configured one, else the task's default (balance) or 1."""
        if configured is not None:
            return float(configured)
        return self.default_balance_weight if name == "balance" else 1.0

    def loss(self, logits: torch.Tensor, class_logits: Optional[torch.Tensor], target: torch.Tensor,
             valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Task loss. logits (B, Q, S, S) at the input size, target (B, S, S), valid (B, 1, S, S) or None."""
        raise NotImplementedError

    def scores(self, mask_logits: torch.Tensor, class_logits: Optional[torch.Tensor]) -> torch.Tensor:
        """One image's per-pixel scores from (Q, H, W) mask logits (and (Q, K+1) class logits)."""
        raise NotImplementedError

    def labels(self, scores: np.ndarray) -> np.ndarray:
        """The label map of :meth:`scores`: a bool mask (binary) or class ids (multi-class)."""
        raise NotImplementedError

    def is_empty(self, labels: np.ndarray) -> bool:
        """Whether a label map predicts nothing (binary: no foreground pixel; multi-class: never)."""
        return False

    def new_metrics(self) -> BinaryMetrics | ConfusionMetrics:
        raise NotImplementedError

    def update(self, metrics: Any, scores: np.ndarray, gt: np.ndarray, name: str) -> None:
        """Add one image's scores against its ground truth to ``metrics``."""
        raise NotImplementedError


class BinaryTask(Task):
    """Foreground vs background: one mask token, structure loss, SOD/polyp metrics, 0/255 PNG masks."""

    kind = "binary"
    metric_names = tuple(BINARY_METRICS)
    plot_metrics = ("dice@0.5", "meanDice", "Sm", "wFm", "meanEm", "MAE")  # BER (percent) only when selected
    default_metric = "Sm"
    default_balance_weight = 1.0
    extra_hints = ("more train.epochs, a larger model.img_size for small structures, or loss.bce=balanced for rare "
                   "foreground")

    def __init__(self, threshold: float = 0.5, bce: str = "mean", iou: bool = True, ber: str = "pooled") -> None:
        self.threshold, self.bce, self.iou, self.ber = threshold, bce, iou, ber
        # named at eval.threshold as BinaryMetrics.compute names them: dice@0.3 in eval.json and metrics.csv
        self.metric_names = tuple(at_threshold_name(n, threshold) for n in BinaryTask.metric_names)
        self.plot_metrics = tuple(at_threshold_name(n, threshold) for n in BinaryTask.plot_metrics)

    def selection_metric(self, metric: str) -> str:
        """``train.metric``'s name at eval.threshold (``dice`` at 0.3: ``dice@0.3``)."""
        return at_threshold_name(super().selection_metric(metric), self.threshold)

    def loss(self, logits, class_logits, target, valid):
        return structure_loss(logits, target.float().unsqueeze(1), valid, self.bce, self.iou)

    def scores(self, mask_logits, class_logits):
        return torch.sigmoid(mask_logits[0])

    def labels(self, scores):
        return scores >= self.threshold

    def is_empty(self, labels):
        return not labels.any()

    def new_metrics(self):
        return BinaryMetrics(self.threshold, self.ber)

    def update(self, metrics, scores, gt, name):
        metrics.update(scores, gt.astype(bool), name)


class MultiClassTask(Task):
    """Classes of ``data.classes``: Q mask tokens + class head, set loss, confusion metrics, palette PNGs."""

    kind = "multiclass"
    metric_names = tuple(MULTICLASS_METRICS)
    plot_metrics = ("mIoU", "mAcc", "pixel_acc")
    default_metric = "mIoU"
    default_balance_weight = 2.0

    def __init__(self, classes: ClassSpec, num_queries: int, weights: SetLossWeights, miou: str = "dataset",
                 sampling: Optional[PointSampling] = None) -> None:
        self.classes, self.num_queries, self.weights, self.miou = classes, num_queries, weights, miou
        self.sampling = sampling  # None: mask losses on every pixel; else Mask2Former's sampled points
        self.num_classes = classes.num_classes
        if num_queries < classes.num_classes:
            warn_once(f"model.num_mask_tokens is {num_queries} for {classes.num_classes} classes: an image with "
                          f"more classes than mask tokens cannot have all of them matched; set "
                          f"model.num_mask_tokens to at least {classes.num_classes}")

    def loss(self, logits, class_logits, target, valid):
        keep = valid[:, 0].bool() if valid is not None else torch.ones_like(target, dtype=torch.bool)
        return set_loss(class_logits, logits, target.long(), keep, self.classes.ignore_index, self.weights,
                        self.sampling)["loss"]  # points drawn from the global RNG: saved and restored on resume

    def scores(self, mask_logits, class_logits):
        return semantic_probs(class_logits, mask_logits)

    decides_in_bands = True  # tiled prediction takes the argmax band by band (samft.engine.infer.tiling)

    def labels(self, scores):
        return scores.labels if isinstance(scores, LabelMap) else scores.argmax(0)

    def new_metrics(self):
        return ConfusionMetrics(self.classes.names, self.classes.ignore_index, self.miou)

    def update(self, metrics, scores, gt, name):
        metrics.update(self.labels(scores), gt, name)


def make_task(cfg: Any) -> Task:
    """The task of a config: multi-class when ``data.classes`` is set, else binary."""
    classes = ClassSpec.of(cfg.data)
    if classes is None:
        return BinaryTask(cfg.eval.threshold, cfg.loss.bce, cfg.loss.iou, cfg.eval.ber)
    return MultiClassTask(classes, cfg.model.num_mask_tokens, SetLossWeights.from_config(cfg.loss), cfg.eval.miou,
                          PointSampling.from_config(cfg.loss.set))

