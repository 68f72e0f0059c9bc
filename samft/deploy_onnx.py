"""Running an exported ``model.onnx`` with numpy and onnxruntime only (no PyTorch, no samft model code).

``samft export --onnx model.onnx`` writes one graph: a normalised image batch (B, 3, S, S) -> binary
mask logits (B, 1, S, S), or multi-class class scores (B, C, S, S), at the model's input size S. This
module does the rest, the way samft's own prediction does it:

- :func:`preprocess`: resize the longest side to S (bilinear, aspect ratio kept), normalise with SAM's
  pixel mean/std, pad bottom/right with zeros (the mean colour) to S x S; returns the valid size.
- :func:`postprocess`: crop the padding, resize bilinearly to the original size, then binary: sigmoid
  and threshold; multi-class: argmax of the class scores.

samft's Python pipeline resizes with OpenCV's fixed-point bilinear for uint8 images; :func:`preprocess`
computes the same interpolation in floating point and rounds, so a resized pixel can differ by one
grey level. Multi-class: samft resizes the mask logits and then forms the class scores; the graph
already holds the class scores at S, which are resized here (a small difference at class borders).
The tests bound both.

Example::

    import numpy as np
    from PIL import Image, ImageOps
    from samft.deploy_onnx import OnnxSegmenter

    seg = OnnxSegmenter("model.onnx")
    image = np.asarray(ImageOps.exif_transpose(Image.open("image.png")).convert("RGB"))
    mask = seg.predict(image)          # (H, W) bool (binary) or class ids (multi-class)
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from samft.constants import PIXEL_MEAN, PIXEL_STD

META_PREFIX = "samft."


def longest_side_size(hw: tuple[int, int], img_size: int) -> tuple[int, int]:
    """The (h, w) after resizing the longest side to ``img_size``, rounded as albumentations'
    LongestMaxSize (samft's pipeline) rounds: Python's ``round`` of ``side * img_size / longest``."""
    scale = img_size / max(hw)
    return max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a half-pixel bilinear resize along one axis (PyTorch's
    ``align_corners=False`` and OpenCV's INTER_LINEAR: no antialiasing)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) float -> (..., h, w) float32, bilinear with half-pixel centres
    (= ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-2:] == tuple(size):
        return x
    i0, i1, w = _axis(x.shape[-2], size[0])
    x = x[..., i0, :] * (1 - w)[:, None] + x[..., i1, :] * w[:, None]
    j0, j1, w = _axis(x.shape[-1], size[1])
    return x[..., j0] * (1 - w) + x[..., j1] * w


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) grey, (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8 (grey repeated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]


def preprocess(image: np.ndarray, img_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 RGB -> (normalised padded (3, S, S) float32, valid (h, w) inside it)."""
    image = as_rgb(image)
    valid = longest_side_size(image.shape[:2], img_size)
    resized = image.astype(np.float32)
    if valid != image.shape[:2]:
        resized = np.clip(np.rint(resize_bilinear(resized.transpose(2, 0, 1), valid)), 0, 255).transpose(1, 2, 0)
    mean, std = np.asarray(PIXEL_MEAN, np.float32), np.asarray(PIXEL_STD, np.float32)
    out = np.zeros((3, img_size, img_size), np.float32)
    out[:, : valid[0], : valid[1]] = ((resized - mean) / std).transpose(2, 0, 1)
    return out, valid


def postprocess(output: np.ndarray, valid_hw: tuple[int, int], orig_hw: tuple[int, int], task: str,
                threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One image's graph output (1, S, S) logits or (C, S, S) scores -> (scores, prediction) at ``orig_hw``.

    binary: (foreground probability (H, W), mask (H, W) bool = probability >= threshold);
    multiclass: (class scores (C, H, W), labels (H, W) uint8/int32 = argmax).
    """
    cropped = np.asarray(output, np.float32)[:, : valid_hw[0], : valid_hw[1]]
    resized = resize_bilinear(cropped, tuple(orig_hw))
    if task == "binary":
        probs = 1.0 / (1.0 + np.exp(-resized[0]))
        return probs, probs >= threshold
    labels = resized.argmax(0)
    return resized, labels.astype(np.uint8 if resized.shape[0] <= 256 else np.int32)


def static_batch(session) -> Optional[int]:
    """The batch size a graph's input is fixed to (an export without ``--dynamic-batch``: 1), None for any."""
    batch = session.get_inputs()[0].shape[0]
    return batch if isinstance(batch, int) else None


def run_session(session, batch: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) normalised float32 -> the graph's output (B, 1 or C, S, S), in chunks the graph accepts."""
    name = session.get_inputs()[0].name
    step = static_batch(session) or len(batch)
    return np.concatenate([session.run(None, {name: batch[i: i + step]})[0] for i in range(0, len(batch), step)])


class OnnxSegmenter:
    """An exported samft model in an onnxruntime session, with samft's pre- and post-processing.

    The graph's metadata (written by ``samft export --onnx``) gives the input size, the task, the
    threshold and the class names.
    """

    def __init__(self, path: str, providers: Optional[Sequence[str]] = None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        meta = {k[len(META_PREFIX):]: v for k, v in self.session.get_modelmeta().custom_metadata_map.items()
                if k.startswith(META_PREFIX)}
        if "img_size" not in meta:
            raise ValueError(f"{path}: not a samft ONNX export (no samft.img_size metadata)")
        self.img_size = int(meta["img_size"])
        self.task = meta["task"]
        self.threshold = float(meta.get("threshold", 0.5))
        self.class_names = json.loads(meta.get("classes", "[]"))
        self.max_batch = static_batch(self.session)  # None: any batch size

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised float32 -> the graph's output (B, 1 or C, S, S), in chunks the graph accepts."""
        return run_session(self.session, batch)

    def scores(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB -> (probability (H, W) or class scores (C, H, W), mask or labels (H, W))."""
        x, valid = preprocess(image, self.img_size)
        out = self.run(x[None])[0]
        return postprocess(out, valid, np.asarray(image).shape[:2], self.task, self.threshold)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> mask (H, W) bool (binary) or class ids (H, W) (multi-class)."""
        return self.scores(image)[1]
