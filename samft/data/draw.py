"""Drawing predictions: PNG bytes, the binary overlay, palette label images and the class overlay with a legend."""

from __future__ import annotations

import io
from typing import Any, Optional

import numpy as np

from samft.data.classes import ClassSpec

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)


def png_bytes(image: np.ndarray | Any, compress_level: int = 6) -> bytes:
    """A PNG file's bytes from an array or a PIL image (``compress_level``: zlib's, 0-9; 6 is Pillow's default)."""
    from PIL import Image

    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG",
                                                                              compress_level=compress_level)
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray | Any, quality: int = 85) -> bytes:
    """A JPEG file's bytes from an RGB array or PIL image (4:4:4 chroma: a mask's thin coloured outline stays
    sharp)."""
    from PIL import Image

    buf = io.BytesIO()
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
    return buf.getvalue()


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the mask tinted red and its outline drawn."""
    import cv2

    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * OVERLAY_COLOUR
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = out.astype(np.uint8)
    cv2.drawContours(out, contours, -1, (255, 255, 0), max(1, round(max(mask.shape) / 400)))
    return out


def label_image(labels: np.ndarray, classes: ClassSpec):
    """A label map as a palette PNG: pixel values are class ids, shown in the classes' colours."""
    from PIL import Image

    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(classes.palette_bytes())
    return im


def class_overlay(image: np.ndarray, labels: np.ndarray, classes: ClassSpec, alpha: float = 0.5):
    """The image blended with the class colours (the background class, if any, left as it is), with a legend of
    the classes shown."""
    from PIL import Image, ImageDraw

    colours = classes.colours[labels]
    blend = image.astype(np.float32)
    fg = labels != classes.background if classes.background is not None else np.ones(labels.shape, bool)
    blend[fg] = (1 - alpha) * blend[fg] + alpha * colours[fg]
    present = [int(c) for c in np.unique(labels)]
    row = 18
    legend_w = 12 + 8 * max(len(classes.names[c]) for c in present) + 30
    h, w = labels.shape
    canvas = Image.new("RGB", (w + legend_w, max(h, row * len(present) + 8)), (255, 255, 255))
    canvas.paste(Image.fromarray(blend.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, c in enumerate(present):
        y = 4 + k * row
        draw.rectangle([w + 6, y, w + 20, y + 12], fill=tuple(int(v) for v in classes.colours[c]), outline=(0, 0, 0))
        draw.text((w + 26, y), classes.names[c], fill=(0, 0, 0))
    return canvas


MASK_COMPRESSION = 1  # masks are mostly runs of one value: level 1 encodes them ~2x faster than 6, files ~1.3x larger


def mask_png(labels: np.ndarray, classes: Optional[ClassSpec] = None) -> bytes:
    """The PNG file of a prediction: a 0/255 mask (binary, ``classes`` None) or a palette PNG of class ids."""
    return png_bytes(labels.astype(np.uint8) * 255 if classes is None else label_image(labels, classes), MASK_COMPRESSION)


def overlay_png(image: np.ndarray, labels: np.ndarray, classes: Optional[ClassSpec] = None) -> bytes:
    """The PNG of the image with the prediction drawn on it (red tint and outline, or class colours + legend)."""
    return png_bytes(overlay(image, labels) if classes is None else class_overlay(image, labels, classes))


def png16_bytes(values: np.ndarray) -> bytes:
    """A 16-bit grey PNG of a map in [0, 1] (H, W): ``round(value * 65535)``, values outside clipped."""
    from PIL import Image

    grey = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * 65535.0).astype(np.uint16)
    return png_bytes(Image.fromarray(grey))  # uint16: mode I;16


def npy_bytes(array: np.ndarray, dtype: type = np.float16) -> bytes:
    """A ``.npy`` file's bytes of ``array`` as ``dtype`` (float16: probability maps at half the size)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()
