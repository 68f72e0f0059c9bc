"""``Segmenter``: a trained run as a Python object that segments images.

    seg = samft.Segmenter.from_run("runs/polyp")
    mask = seg.predict("image.png")                   # (H, W) bool (binary) or class ids (multi-class)
    masks = seg.predict_batch([array, pil_image, path])
    prob = seg.predict_scores(array)                  # (H, W) probability or (C, H, W) class scores

Images may be paths, PIL images or arrays ((H, W) grey or (H, W, 3|4) RGB[A], uint8); results come at
each image's own size, computed exactly as ``samft predict`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from samft.config import Config
from samft.data.io import read_image
from samft.data.transforms import SamTransform
from samft.engine.artifacts.rundir import ADAPTER_FILE
from samft.engine.artifacts.loading import load_run, run_device
from samft.engine.runtime import autocast, resolve_precision
from samft.errors import DataError
from samft.model.semantic import SemanticSAM, image_scores
from samft.tasks.task import Task, make_task


def as_rgb(image: Any) -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB (a clear error for anything else)."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise DataError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise DataError(f"image array: expected dtype uint8 (0..255), got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise DataError(f"image array: expected shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")


@torch.no_grad()
def scores_of_arrays(model: SemanticSAM, task: Task, transform: SamTransform, arrays: Sequence[np.ndarray],
                     device: torch.device, precision: str = "fp32") -> list[np.ndarray]:
    """(H, W, 3) uint8 images -> the task's per-pixel scores of each at its own size (float32), in one forward
    pass: ``transform`` (resize, pad, normalise), the model, the padding cropped, resized back."""
    if not len(arrays):
        return []
    items = [transform(a) for a in arrays]
    x = torch.stack([it["image"] for it in items]).to(device)
    with autocast(device, precision):
        out = model(x)
    return [image_scores(task, out, j, model.img_size, items[j]["valid_hw"].tolist(), list(a.shape[:2]))
            .float().cpu().numpy() for j, a in enumerate(arrays)]


class Segmenter:
    """A model, its task and its device, predicting at each image's original size."""

    def __init__(self, model: SemanticSAM, cfg: Config, device: torch.device, precision: str = "fp32",
                 task: Optional[Task] = None) -> None:
        self.model, self.cfg, self.device, self.precision = model.eval(), cfg, device, precision
        self.task = task or make_task(cfg)
        self.transform = SamTransform(model.img_size, 0.0, resize=cfg.data.resize)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", adapter: str = ADAPTER_FILE) -> "Segmenter":
        """The run's best adapter (``adapter_last.safetensors`` with ``adapter=``) on ``device``."""
        dev = run_device(run_dir, device)
        run = load_run(run_dir, dev, adapter)
        return cls(run.model, run.cfg, dev, resolve_precision(run.cfg.train.precision, dev))

    def predict_scores_batch(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Per-pixel scores of each image, in one forward pass."""
        arrays = [as_rgb(im) for im in images]
        return scores_of_arrays(self.model, self.task, self.transform, arrays, self.device, self.precision)

    def predict_scores(self, image: Any) -> np.ndarray:
        return self.predict_scores_batch([image])[0]

    def predict_batch(self, images: Sequence[Any], batch_size: Optional[int] = None) -> list[np.ndarray]:
        """Label maps of many images, ``batch_size`` (default ``eval.batch_size``) per forward pass."""
        n = batch_size or self.cfg.eval.batch_size
        images = list(images)
        out: list[np.ndarray] = []
        for i in range(0, len(images), n):
            out += [self.task.labels(s) for s in self.predict_scores_batch(images[i:i + n])]
        return out

    def predict(self, image: Any) -> np.ndarray:
        """The label map of one image: (H, W) bool for binary tasks, class ids for multi-class ones."""
        return self.predict_batch([image])[0]
