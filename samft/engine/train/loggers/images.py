"""The validation images the trackers show: the first few validation images (the same ones at every validation,
so their masks can be followed), each as one picture image | true mask | predicted mask, the masks drawn as
``samft predict --overlay`` draws them (:mod:`samft.data.draw`)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from samft.data.classes import ClassSpec
from samft.data.draw import class_overlay, overlay
from samft.data.io import read_image
from samft.data.layouts import Pair
from samft.engine.infer.evaluate import iter_predictions
from samft.engine.train.loggers import Images

IMAGES = 4  # validation images shown
PANEL = 256  # each panel's longer side, in pixels
GAP = 4


def _panel(image: np.ndarray, labels: Optional[np.ndarray], classes: Optional[ClassSpec]) -> np.ndarray:
    """The image with ``labels`` drawn on it (none: the image), its longer side scaled to :data:`PANEL`."""
    from PIL import Image

    if labels is not None:
        if classes is None:
            drawn = overlay(image, labels.astype(bool))
        else:
            shown = np.where(labels == classes.ignore_index, classes.background or 0, labels)
            drawn = np.asarray(class_overlay(image, shown, classes))
    else:
        drawn = image
    h, w = drawn.shape[:2]
    scale = PANEL / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(np.ascontiguousarray(drawn, dtype=np.uint8)).resize(size, Image.BILINEAR))


def side_by_side(panels: list[np.ndarray]) -> np.ndarray:
    """The panels in a row on white, top-aligned, :data:`GAP` pixels apart."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p[..., :3]
        x += p.shape[1] + GAP
    return out


def validation_images(model: Any, pairs: list[Pair], cfg: Any, task: Any, device: torch.device,
                      precision: str) -> Images:
    """(name, image | truth | prediction) of the first :data:`IMAGES` of ``pairs``, predicted as the validation
    predicts (original resolution); the random number streams are left as they were."""
    out: Images = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for pair, scores, gt in iter_predictions(model, pairs[:IMAGES], cfg.eval.batch_size, device, task, precision,
                                                 0, False, cfg.data.resize, None):
            image = read_image(pair.image)
            truth = gt if gt is not None and gt.shape == image.shape[:2] else None
            panels = [_panel(image, None, task.classes), _panel(image, truth, task.classes),
                      _panel(image, task.labels(scores), task.classes)]
            out.append((pair.name, side_by_side(panels)))
    return out
