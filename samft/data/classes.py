"""Multi-class masks: class ids, palette PNGs and RGB colour-coded masks, mapped through ``data.classes``.

- A palette PNG ('P') stores class ids as its indices (VOC's SegmentationClass).
- A grey PNG stores class ids as grey values.
- An RGB(A) mask codes each class by a colour of ``data.palette`` (VOC's colour map when empty);
  ``data.ignore_colors`` (VOC's (224, 224, 192) boundary) become ``data.ignore_index``.

A class id outside the class list, or a colour that is in neither the palette nor the ignore colours,
is an error naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from samft.data.io import _mask_array
from samft.errors import DataError

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_colormap(n: int = 256) -> np.ndarray:
    """Pascal VOC's colour map: (n, 3) uint8, class i -> the colour of VOC's palette PNGs."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def distinct_palette(n: int, background: Optional[int] = 0) -> np.ndarray:
    """(n, 3) uint8 colours far apart (golden-ratio hues, two brightness levels); the background black."""
    import colorsys

    colours = np.zeros((n, 3), dtype=np.uint8)
    k = 0
    for i in range(n):
        if i == background:
            continue
        hue = (k * 0.618033988749895) % 1.0
        value = 0.95 if k % 2 == 0 else 0.7
        colours[i] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, value)]
        k += 1
    return colours


@dataclass(frozen=True)
class ClassSpec:
    """What a multi-class mask means: class names, their colours, and what is ignored.

    ``palette`` decodes colour-coded masks (``data.palette``, else VOC's colour map); ``display`` colours
    predictions and overlays (``data.palette``, else VOC's colours for VOC data, else distinct colours with
    the background black). ``background`` is the background class id, or None when the data has none.
    """

    names: tuple[str, ...]
    palette: np.ndarray  # (C, 3) uint8
    ignore_index: int
    ignore_colors: tuple[tuple[int, int, int], ...]
    background: Optional[int] = 0
    display: Optional[np.ndarray] = None  # (C, 3) uint8; None = palette

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def of(cls, data: Any) -> Optional["ClassSpec"]:
        """The spec of a multi-class ``DataConfig``, or None for a binary one (empty ``data.classes``)."""
        if not data.classes:
            return None
        n = len(data.classes)
        background = getattr(data, "background", 0)
        if data.palette:
            palette = display = np.array(data.palette, dtype=np.uint8).reshape(-1, 3)
        else:
            palette = voc_colormap(n)[:n]
            voc = getattr(data, "format", "") == "voc" or tuple(data.classes) == VOC_CLASSES[:n]
            display = palette if voc else distinct_palette(n, background)
        return cls(tuple(data.classes), palette, data.ignore_index,
                   tuple(tuple(int(v) for v in c) for c in data.ignore_colors), background, display)

    @property
    def colours(self) -> np.ndarray:
        """The display colours (see the class docstring)."""
        return self.palette if self.display is None else self.display

    def palette_bytes(self) -> list[int]:
        """A 256-entry PIL palette: the classes' colours, then VOC's colour map; ignore shown in cream."""
        full = voc_colormap(256)
        full[: self.num_classes] = self.colours
        if 0 <= self.ignore_index < 256:
            full[self.ignore_index] = (224, 224, 192)
        return full.reshape(-1).tolist()


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
