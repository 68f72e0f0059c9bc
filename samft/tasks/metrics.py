"""Binary segmentation metrics: one implementation for training validation, ``eval`` and ``score``.

Names in ``eval.json`` (and the alias accepted by ``train.metric``):

| name | alias | definition |
|---|---|---|
| dice@0.5, iou@0.5 | dice, iou | per image at ``prob >= 0.5``, averaged over images (both empty = 1); at another ``eval.threshold`` t named ``dice@t``, ``iou@t`` (and ``BER@t``) |
| meanDice, meanIoU, maxDice | mdice, meaniou, maxdice | PraNet's protocol: the map is min-max normalised, Dice/IoU at 256 thresholds 1..0 (0 when nothing overlaps), averaged over images; mean (or max) over thresholds |
| Sm | sm | S-measure (pysodmetrics) |
| wFm | wfm | weighted F-measure (pysodmetrics) |
| meanEm, maxEm, adpEm | em, maxem, adpem | E-measure: mean / max of the 256-threshold curve, adaptive (pysodmetrics) |
| MAE | mae | mean absolute error of the min-max normalised map (pysodmetrics) |
| BER | ber | balanced error rate in percent at 0.5, ``100 (1 - (TP/P + TN/N) / 2)`` from counts pooled over the set (shadow detection); ``eval.ber=per_image``: the mean of each image's BER (AutoGluon, see ``image_ber``) |

Multi-class (``data.classes``): ``mIoU`` (alias miou; mean over classes, background included, of
TP / (TP + FP + FN), classes absent from both prediction and ground truth left out), ``mAcc`` (macc; mean
per-class recall), ``pixel_acc`` (acc), and the IoU of each class, all from one confusion matrix over the
pixels whose ground truth is not ``ignore_index``; matrices from several processes add up exactly.
``eval.miou=per_class_all`` is AutoGluon's mIoU instead (see ``per_class_all_iou``).

S-measure, E-measure, weighted F-measure and MAE come from ``pysodmetrics`` (checked against the MATLAB
toolbox); predictions reach it as 8-bit grey maps, which it min-max normalises per image: the standard
COD/polyp protocol. Each image's results are kept, so results from several processes merge exactly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from samft.config.metric_names import (ALIASES, ALL_METRICS, BINARY_METRICS, METRIC_CHOICES,  # noqa: F401
                                       THRESHOLD_METRICS, at_threshold_name, base_name,
                                       MULTICLASS_METRICS, canonical, higher_is_better,
                                       task_metric_names)

THRESHOLDS = np.linspace(1.0, 0.0, 256)  # PraNet's 1:-1/255:0


def for_every_image(kind: str) -> str:
    """A :meth:`degenerate` kind as warnings say it: ``empty for every image``, ``one class: sky for every
    image``; a collapse already says what it is."""
    return f"{kind} for every image" if kind in ("empty", "full") or kind.startswith("one class") else kind


def image_ber(tp: float, tn: float, pos: float, neg: float) -> float:
    """One image's BER in percent as AutoGluon's ``Balanced_Error_Rate`` computes it (torchmetrics' sample-wise
    macro accuracy over the classes {background, foreground}): ``100 (1 - mean of the classes' recalls)``, where a
    class absent from both the ground truth and the prediction is left out and a recall of 0/0 counts 0 (a
    foreground predicted on an image without any scores 50 % or worse). A fully correct image scores 0."""
    fp, fn = neg - tn, pos - tp
    classes = ((tp, pos, tp + fp + fn), (tn, neg, tn + fn + fp))  # (hits, support, tp + fp + fn) per class
    recalls = [hits / support if support else 0.0 for hits, support, seen in classes if seen > 0]
    return 100.0 * (1.0 - float(np.mean(recalls))) if recalls else 0.0


def per_class_all_iou(matrix: np.ndarray, ignored_pred: np.ndarray) -> np.ndarray:
    """AutoGluon's per-class IoU (``Multiclass_IoU``: histograms of prediction, label and intersection).

    matrix (C, C): confusion over non-ignored pixels (rows ground truth); ignored_pred (C,): predictions on
    ignore-labelled pixels, which enter each class's prediction area, hence its union. A class with an empty
    union scores 0 (its mean is over every class).
    """
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + ignored_pred + matrix.sum(1) - tp
    return np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as a perfect match."""
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    union = total - inter
    dice = 1.0 if total == 0 else 2.0 * inter / total
    iou = 1.0 if union == 0 else inter / union
    return float(dice), float(iou)


def minmax(pred: np.ndarray) -> np.ndarray:
    """MATLAB's ``mapminmax`` on a map in [0, 1] (left as it is when constant)."""
    lo, hi = float(pred.min()), float(pred.max())
    return (pred - lo) / (hi - lo) if hi > lo else pred


def threshold_curves(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PraNet's Dice and IoU at each of the 256 thresholds (``pred >= t``; 0 when nothing overlaps).

    ``pred`` is the normalised map in [0, 1]; counts come from sorted values, not 256 passes.
    """
    values = np.sort(pred.ravel())
    fg_values = np.sort(pred[gt])
    n_pred = values.size - np.searchsorted(values, THRESHOLDS, side="left")
    inter = fg_values.size - np.searchsorted(fg_values, THRESHOLDS, side="left")
    n_gt = fg_values.size
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(inter > 0, 2.0 * inter / (n_gt + n_pred), 0.0)
        iou = np.where(inter > 0, inter / (n_gt + n_pred - inter), 0.0)
    return dice, iou


def at_threshold(metrics: dict[str, float], threshold: float) -> dict[str, float]:
    """``metrics`` named at 0.5 (the table's names) renamed for the threshold they were computed at:
    ``dice@0.3``, ``iou@0.3``, ``BER@0.3`` at 0.3 (the names of 0.5, the default, are kept)."""
    return {at_threshold_name(k, threshold): v for k, v in metrics.items()}


class BinaryMetrics:
    """Accumulates per-image results; ``compute()`` reduces them over the images of a set."""

    KEYS = ("name", "dice", "iou", "sm", "wfm", "mae", "em_curve", "em_adp", "dice_curve", "iou_curve", "counts")

    def __init__(self, threshold: float = 0.5, ber: str = "pooled") -> None:
        if ber not in ("pooled", "per_image"):
            raise ValueError(f"unknown BER mode {ber!r}; expected pooled or per_image")
        self.threshold, self.ber = threshold, ber
        self.records: dict[str, list] = {k: [] for k in self.KEYS}

    def __len__(self) -> int:
        return len(self.records["name"])

    def update(self, prob: np.ndarray, gt: np.ndarray, name: str = "") -> None:
        """prob: (H, W) float in [0, 1]; gt: (H, W) bool of the same size."""
        import py_sod_metrics.sod_metrics as sod  # not the package: its __init__ imports scikit-learn (samft.imports)

        if prob.shape != gt.shape:
            raise ValueError(f"{name}: prediction {prob.shape} and ground truth {gt.shape} differ in size")
        gt = gt.astype(bool)
        pred_u8 = np.clip(np.round(prob * 255.0), 0, 255).astype(np.uint8)
        gt_u8 = gt.astype(np.uint8) * 255
        binary = prob >= self.threshold
        d, i = dice_iou(binary, gt)
        sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(), sod.MAE()
        for m in (sm, em, wfm, mae):
            m.step(pred_u8, gt_u8)
        dice_curve, iou_curve = threshold_curves(minmax(pred_u8 / 255.0), gt)
        tp = int(np.logical_and(binary, gt).sum())
        tn = int(np.logical_and(~binary, ~gt).sum())
        r = self.records
        r["name"].append(name)
        r["dice"].append(d)
        r["iou"].append(i)
        r["sm"].append(float(sm.sms[-1]))
        r["wfm"].append(float(wfm.weighted_fms[-1]))
        r["mae"].append(float(mae.maes[-1]))
        r["em_curve"].append(np.asarray(em.changeable_ems[-1], dtype=np.float64).reshape(-1))
        r["em_adp"].append(float(em.adaptive_ems[-1]))
        r["dice_curve"].append(dice_curve)
        r["iou_curve"].append(iou_curve)
        r["counts"].append((tp, tn, int(gt.sum()), int((~gt).sum())))

    def extras(self) -> dict:
        """What eval.json records beside the metrics (nothing for binary sets)."""
        return {}

    def degenerate(self) -> Optional[str]:
        """``"empty"`` / ``"full"`` when every image's thresholded prediction is empty / all foreground."""
        if not len(self):
            return None
        predicted = [tp + neg - tn for tp, tn, pos, neg in self.records["counts"]]  # predicted foreground pixels
        if all(p == 0 for p in predicted):
            return "empty"
        if all(p == pos + neg for p, (_, _, pos, neg) in zip(predicted, self.records["counts"])):
            return "full"
        return None

    def merge(self, other: "BinaryMetrics") -> None:
        for key, values in other.records.items():
            self.records[key].extend(values)

    def per_image(self) -> list[dict]:
        """Each image's metrics from its kept record (nothing recomputed): ``{"name": ..., metric: value}`` with
        the names of :meth:`compute`, each metric of one image alone (BER: :func:`image_ber`)."""
        r = self.records
        return [{"name": r["name"][k], "dice@0.5": r["dice"][k], "iou@0.5": r["iou"][k],
                 "meanDice": float(np.mean(r["dice_curve"][k])), "meanIoU": float(np.mean(r["iou_curve"][k])),
                 "maxDice": float(np.max(r["dice_curve"][k])), "Sm": r["sm"][k], "wFm": r["wfm"][k],
                 "meanEm": float(np.mean(r["em_curve"][k])), "maxEm": float(np.max(r["em_curve"][k])),
                 "adpEm": r["em_adp"][k], "MAE": r["mae"][k], "BER": image_ber(*r["counts"][k])}
                for k in range(len(self))]

    def compute(self) -> dict[str, float]:
        """The set's metrics, named for the threshold they were computed at (:func:`at_threshold`: ``dice@0.3``
        at ``eval.threshold`` 0.3), as eval.json and metrics.csv name them."""
        return at_threshold(self._compute(), self.threshold)

    def _compute(self) -> dict[str, float]:
        r = self.records
        if not r["name"]:
            return {name: float("nan") for name in BINARY_METRICS}
        em_curve = np.mean(np.stack(r["em_curve"]), axis=0)
        dice_curve = np.mean(np.stack(r["dice_curve"]), axis=0)
        iou_curve = np.mean(np.stack(r["iou_curve"]), axis=0)
        tp, tn, pos, neg = np.sum(np.array(r["counts"], dtype=np.float64), axis=0)
        sensitivity = tp / pos if pos else 1.0
        specificity = tn / neg if neg else 1.0
        ber = 100.0 * (1.0 - 0.5 * (sensitivity + specificity))
        if self.ber == "per_image":
            ber = float(np.mean([image_ber(*counts) for counts in r["counts"]]))
        return {
            "dice@0.5": float(np.mean(r["dice"])),
            "iou@0.5": float(np.mean(r["iou"])),
            "meanDice": float(np.mean(dice_curve)),
            "meanIoU": float(np.mean(iou_curve)),
            "maxDice": float(np.max(dice_curve)),
            "Sm": float(np.mean(r["sm"])),
            "wFm": float(np.mean(r["wfm"])),
            "meanEm": float(np.mean(em_curve)),
            "maxEm": float(np.max(em_curve)),
            "adpEm": float(np.mean(r["em_adp"])),
            "MAE": float(np.mean(r["mae"])),
            "BER": float(ber),
        }


def image_confusion_metrics(matrix: np.ndarray) -> dict[str, float]:
    """One image's metrics from its own confusion matrix: ``mIoU`` over the classes present in its prediction or
    ground truth, ``mAcc`` over the classes of its ground truth, ``pixel_acc``; NaN when no pixel is scored."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    truth = matrix.sum(1)
    nan = float("nan")
    return {"mIoU": float(np.mean(tp[union > 0] / union[union > 0])) if (union > 0).any() else nan,
            "mAcc": float(np.mean(tp[truth > 0] / truth[truth > 0])) if (truth > 0).any() else nan,
            "pixel_acc": float(tp.sum() / matrix.sum()) if matrix.sum() else nan}


class ConfusionMetrics:
    """Multi-class metrics from a confusion matrix (rows: ground truth, columns: prediction)."""

    def __init__(self, class_names: tuple[str, ...], ignore_index: int = 255, miou: str = "dataset") -> None:
        if miou not in ("dataset", "per_class_all"):
            raise ValueError(f"unknown mIoU mode {miou!r}; expected dataset or per_class_all")
        self.class_names = tuple(class_names)
        self.ignore_index, self.miou = ignore_index, miou
        n = len(class_names)
        self.matrix = np.zeros((n, n), dtype=np.int64)
        self.ignored_pred = np.zeros(n, dtype=np.int64)  # predictions on ignore-labelled pixels (per_class_all)
        self.images = 0
        self.records: list[dict] = []  # each image's own metrics (:meth:`per_image`)

    def __len__(self) -> int:
        return self.images

    def update(self, pred: np.ndarray, gt: np.ndarray, name: str = "") -> None:
        """pred, gt: (H, W) class ids of the same size; ``ignore_index`` pixels of gt are left out."""
        if pred.shape != gt.shape:
            raise ValueError(f"{name}: prediction {pred.shape} and ground truth {gt.shape} differ in size")
        n = len(self.class_names)
        keep = gt != self.ignore_index
        index = gt[keep].astype(np.int64) * n + pred[keep].astype(np.int64)
        image = np.bincount(index, minlength=n * n).reshape(n, n)
        self.matrix += image
        self.ignored_pred += np.bincount(pred[~keep].astype(np.int64), minlength=n)[:n]
        self.images += 1
        self.records.append({"name": name, **image_confusion_metrics(image)})

    def extras(self) -> dict:
        """What eval.json records beside the metrics: the IoU of each class."""
        return {"per_class_iou": self.per_class_iou()}

    COLLAPSE_SHARE = 0.99  # one class over this share of the predicted pixels ...
    PRESENT_SHARE = 0.01  # ... while at least two classes each hold this share of the truth

    def degenerate(self) -> Optional[str]:
        """``"one class: NAME"`` when every scored pixel of every image is predicted as one class, or
        ``"collapsed to NAME (S % of the predicted pixels ...)"`` when one class takes over 99 % of the predicted
        pixels while the truth has two or more classes of 1 % or more (a handful of stray pixels does not hide a
        collapse)."""
        predicted, truth = self.matrix.sum(axis=0), self.matrix.sum(axis=1)
        if not self.images or not predicted.sum():
            return None
        if np.count_nonzero(predicted) == 1:
            return f"one class: {self.class_names[int(np.argmax(predicted))]}"
        top = int(np.argmax(predicted))
        share = predicted[top] / predicted.sum()
        present = int(np.count_nonzero(truth / max(truth.sum(), 1) >= self.PRESENT_SHARE))
        if share > self.COLLAPSE_SHARE and present >= 2:
            return (f"collapsed to {self.class_names[top]} ({100 * share:.1f} % of the predicted pixels, while the "
                    f"ground truth has {present} classes)")
        return None

    def merge(self, other: "ConfusionMetrics") -> None:
        self.matrix += other.matrix
        self.ignored_pred += other.ignored_pred
        self.images += other.images
        self.records.extend(other.records)

    def per_image(self) -> list[dict]:
        """Each image's ``{"name": ..., "mIoU", "mAcc", "pixel_acc"}`` (:func:`image_confusion_metrics`)."""
        return [dict(r) for r in self.records]

    def per_class_iou(self) -> dict[str, Optional[float]]:
        """Each class's IoU (``dataset``: None for a class absent from prediction and ground truth)."""
        if self.miou == "per_class_all":
            return dict(zip(self.class_names, map(float, per_class_all_iou(self.matrix, self.ignored_pred))))
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        return {name: (float(tp[i] / union[i]) if union[i] else None) for i, name in enumerate(self.class_names)}

    def compute(self) -> dict[str, float]:
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        gt_count = self.matrix.sum(1)
        total = self.matrix.sum()
        present = union > 0
        miou = float(np.mean(tp[present] / union[present])) if present.any() else float("nan")
        if self.miou == "per_class_all":
            miou = float(np.mean(per_class_all_iou(self.matrix, self.ignored_pred)))
        return {
            "mIoU": miou,
            "mAcc": float(np.mean(tp[gt_count > 0] / gt_count[gt_count > 0])) if (gt_count > 0).any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total else float("nan"),
        }
