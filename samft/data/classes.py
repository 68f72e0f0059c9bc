"""Multi-class masks: class ids, palette PNGs and RGB colour-coded masks, mapped through ``data.classes``.

- A palette PNG ('P') stores class ids as its indices (VOC's SegmentationClass).
- A grey PNG stores class ids as grey values.
- An RGB(A) mask codes each class by a colour of ``data.palette`` (VOC's colour map when empty);
  ``data.ignore_colors`` (VOC's (224, 224, 192) boundary) become ``data.ignore_index``.

A class id outside the class list, or a colour that is in neither the palette nor the ignore colours,
is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samft.data.io import _mask_array
from samft.errors import DataError
from samft.tasks import VOC_CLASSES, ClassSpec, voc_colormap  # noqa: F401  (re-exported)


def colours_to_ids(rgb: np.ndarray, spec: ClassSpec, path: Path) -> np.ndarray:
    """(H, W, 3) colour-coded mask -> (H, W) class ids (ignore colours -> ignore_index)."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    lut: dict[int, int] = {}
    for i, (r, g, b) in enumerate(spec.palette.tolist()):
        lut.setdefault((r << 16) | (g << 8) | b, i)
    for r, g, b in spec.ignore_colors:
        lut[(r << 16) | (g << 8) | b] = spec.ignore_index
    values, inverse = np.unique(code, return_inverse=True)
    unknown = [v for v in values.tolist() if v not in lut]
    if unknown:
        shown = [((v >> 16) & 255, (v >> 8) & 255, v & 255) for v in unknown[:4]]
        raise DataError(f"{path}: colour(s) {shown} are not in the palette of data.classes "
                        f"({spec.num_classes} classes) nor in data.ignore_colors")
    ids = np.array([lut[v] for v in values.tolist()], dtype=np.int64)[inverse]
    return ids.reshape(code.shape)


def mask_to_ids(image, spec: ClassSpec, path: Path) -> np.ndarray:
    """A decoded PIL mask -> (H, W) int64 class ids, checked against the class list."""
    if image.mode in ("RGB", "RGBA"):
        ids = colours_to_ids(np.asarray(image.convert("RGB")), spec, path)
    elif image.mode == "P":
        ids = np.asarray(image).astype(np.int64)
    else:
        ids = _mask_array(image).astype(np.int64)
    bad = np.unique(ids[(ids >= spec.num_classes) & (ids != spec.ignore_index)])
    if bad.size:
        raise DataError(f"{path}: class id(s) {bad[:6].tolist()} outside the {spec.num_classes} classes of "
                        f"data.classes (ids 0..{spec.num_classes - 1}, {spec.ignore_index} = ignore)")
    return ids
