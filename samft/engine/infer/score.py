"""Scoring saved prediction maps against ground truth with the same metrics as ``samft eval``.

Predictions are matched to ground-truth masks by file stem. A prediction is a grey map (8-bit 0..255,
16-bit 0..65535, float TIFF in [0, 1]) or a ``.npy`` array of probabilities; a map of another size is
resized (bilinear) to its mask, as PraNet's evaluation does.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from samft.data.io import IMAGE_EXTS, read_binary_mask, read_mask_values
from samft.data.layouts import list_images
from samft.progress import progress
from samft.errors import DataError
from samft.tasks.metrics import BinaryMetrics

PRED_EXTS = IMAGE_EXTS + (".npy",)


def _read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, memory-mapped first: a header claiming more bytes than the file holds (300 GiB, say) is
    refused without allocating, and an object array (it would need unpickling) is never loaded."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e) or "Python objects" in str(e):
            raise DataError(f"{path}: the .npy holds Python objects, not numbers, and was not loaded") from None
        raise DataError(f"{path}: the .npy is damaged or truncated (its header asks for more than the file "
                        f"holds: {str(e).split('.')[0]})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the .npy prediction ({e.strerror or e})") from None
    return np.array(mapped)


def _check_not_all_nan(path: Path, arr: np.ndarray) -> None:
    """A map of NaN only (a failed export) would be scored as an empty prediction: refuse it."""
    if arr.size and np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).all():
        raise DataError(f"{path}: every value of the prediction map is NaN; expected probabilities in [0, 1] "
                        f"(it would have been scored as an empty mask)")


def check_threshold(threshold: float) -> float:
    """``--threshold``: a probability in [0, 1]."""
    if not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise DataError(f"--threshold {threshold}: expected a probability between 0 and 1")
    return threshold


def read_prediction(path: Path) -> np.ndarray:
    """A prediction map as float32 probabilities in [0, 1]."""
    if path.suffix.lower() == ".npy":
        arr = np.squeeze(_read_npy(path))
        _check_not_all_nan(path, arr)
        if arr.ndim != 2:
            raise DataError(f"{path}: expected a 2-D probability map, got shape {arr.shape}")
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise DataError(f"{path}: probabilities must lie in [0, 1], got [{np.nanmin(arr):.3g}, {np.nanmax(arr):.3g}]")
        return np.nan_to_num(arr.astype(np.float32))
    values = read_mask_values(path)
    _check_not_all_nan(path, values)
    if values.dtype == np.uint16 or values.max(initial=0) > 255:
        return (values.astype(np.float32) / 65535.0).clip(0, 1)
    return values.astype(np.float32) / 255.0


def score_folders(pred_dir: str | Path, gt_dir: str | Path, threshold: float = 0.5,
                  show_progress: bool = True) -> dict:
    """Metrics of every prediction in ``pred_dir`` against the mask of the same stem in ``gt_dir``."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    check_threshold(threshold)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: prediction folder not found")
    gts = {p.stem: p for p in list_images(gt_dir, "ground-truth")}
    if not gts:
        raise DataError(f"{gt_dir}: the ground-truth folder holds no masks; nothing to score")
    preds: dict[str, Path] = {}
    for p in sorted(pred_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in PRED_EXTS and not p.name.startswith("."):
            preds.setdefault(p.stem, p)
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise DataError(f"{pred_dir}: no prediction for {len(missing)} of {len(gts)} masks (first: "
                        f"{gts[missing[0]].name}); predictions are matched to masks by file stem")
    metrics = BinaryMetrics(threshold)
    resized = 0
    with progress("score", len(gts), show_progress) as advance:
        for stem, gt_path in sorted(gts.items()):
            gt = read_binary_mask(gt_path)
            prob = read_prediction(preds[stem])
            if prob.shape != gt.shape:
                prob = cv2.resize(prob, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
                resized += 1
            metrics.update(np.clip(prob, 0, 1), gt, stem)
            advance()
    return {"pred": str(pred_dir), "gt": str(gt_dir), "threshold": threshold, "n_images": len(metrics),
            "resized": resized, "unmatched_predictions": len(set(preds) - set(gts)),
            "metrics": metrics.compute()}
