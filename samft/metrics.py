"""Binary segmentation metrics, one implementation for training validation, ``eval`` and ``score``.

S-measure, E-measure, weighted F-measure and MAE come from ``pysodmetrics`` (checked against the MATLAB
toolbox). Predictions are given as probabilities in [0, 1]; they are passed to pysodmetrics as 8-bit
grey maps, which it min-max normalises per image, the standard COD/polyp protocol. Dice and IoU are
per image at a threshold (pred >= t), then averaged over images.

Each image's results are kept, so results from several processes can be merged without duplicates.
"""

from __future__ import annotations

import numpy as np
import py_sod_metrics as sod

# name in eval.json -> (short alias accepted in configs, higher is better)
BINARY_METRICS: dict[str, tuple[str, bool]] = {
    "dice@0.5": ("dice", True),
    "iou@0.5": ("iou", True),
    "Sm": ("sm", True),
    "meanEm": ("em", True),
    "wFm": ("wfm", True),
    "MAE": ("mae", False),
}
ALIASES = {alias: name for name, (alias, _) in BINARY_METRICS.items()}


def canonical(name: str) -> str:
    """The eval.json name of a metric given its name or short alias (``sm`` -> ``Sm``)."""
    return ALIASES.get(name, name)


def higher_is_better(name: str) -> bool:
    return BINARY_METRICS[canonical(name)][1]


def dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as a perfect match."""
    inter = np.logical_and(pred, gt).sum()
    total = pred.sum() + gt.sum()
    union = total - inter
    dice = 1.0 if total == 0 else 2.0 * inter / total
    iou = 1.0 if union == 0 else inter / union
    return float(dice), float(iou)


class BinaryMetrics:
    """Accumulates per-image results; ``compute()`` averages them over images."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.records: dict[str, list] = {"name": [], "dice": [], "iou": [], "sm": [], "wfm": [], "mae": [],
                                         "em_curve": []}

    def __len__(self) -> int:
        return len(self.records["name"])

    def update(self, prob: np.ndarray, gt: np.ndarray, name: str = "") -> None:
        """prob: (H, W) float in [0, 1]; gt: (H, W) bool, same size."""
        if prob.shape != gt.shape:
            raise ValueError(f"{name}: prediction {prob.shape} and ground truth {gt.shape} differ in size")
        gt = gt.astype(bool)
        pred_u8 = np.clip(np.round(prob * 255.0), 0, 255).astype(np.uint8)
        gt_u8 = gt.astype(np.uint8) * 255
        d, i = dice_iou(prob >= self.threshold, gt)
        sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(), sod.MAE()
        for m in (sm, em, wfm, mae):
            m.step(pred_u8, gt_u8)
        r = self.records
        r["name"].append(name)
        r["dice"].append(d)
        r["iou"].append(i)
        r["sm"].append(float(sm.sms[-1]))
        r["wfm"].append(float(wfm.weighted_fms[-1]))
        r["mae"].append(float(mae.maes[-1]))
        r["em_curve"].append(np.asarray(em.changeable_ems[-1], dtype=np.float64).reshape(-1))

    def merge(self, other: "BinaryMetrics") -> None:
        for key, values in other.records.items():
            self.records[key].extend(values)

    def compute(self) -> dict[str, float]:
        r = self.records
        if not r["name"]:
            return {name: float("nan") for name in BINARY_METRICS}
        em_curve = np.mean(np.stack(r["em_curve"]), axis=0)
        return {
            "dice@0.5": float(np.mean(r["dice"])),
            "iou@0.5": float(np.mean(r["iou"])),
            "Sm": float(np.mean(r["sm"])),
            "meanEm": float(np.mean(em_curve)),
            "wFm": float(np.mean(r["wfm"])),
            "MAE": float(np.mean(r["mae"])),
        }
