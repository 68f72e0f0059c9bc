"""Reading images and masks, with errors that name the file.

A corrupt or truncated file is an error, never a black image or an empty mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from samft.errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode as partly black

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def _open(path: Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # camera rotation: pixels as a viewer shows them
            im.load()
            return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read {what}: the file is corrupt, truncated or not an image ({e})") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth or float grey array to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (np.issubdtype(arr.dtype, np.integer) and arr.max(initial=0) > 255):
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(np.round(arr.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 255.0 / max(hi - lo, 1e-12)
        base = 0.0 if hi <= 1.0 and lo >= 0.0 else lo
        return np.clip(np.round((np.nan_to_num(arr) - base) * scale), 0, 255).astype(np.uint8)
    return arr.astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB: grey is repeated, alpha dropped, 16-bit scaled, EXIF applied."""
    im = _open(Path(path), "image")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = _to_uint8(np.array(im))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def read_mask_values(path: str | Path) -> np.ndarray:
    """A mask's raw values as (H, W): palette indices for 'P' images, grey levels otherwise.

    RGB(A) masks are converted to grey (luminance); 16-bit masks keep their values.
    """
    im = _open(Path(path), "mask")
    if im.mode == "P":
        return np.array(im)
    if im.mode == "1":
        return np.array(im).astype(np.uint8)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.array(im)
    if im.mode == "F":
        return _to_uint8(np.array(im))
    if im.mode in ("RGBA", "LA") and np.asarray(im.convert("L")).max() == 0:
        return np.asarray(im.getchannel("A")).copy()  # an all-black mask whose shape is in the alpha channel
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im).copy()


def binarize(values: np.ndarray) -> np.ndarray:
    """Foreground where the value is > 127, or > 0 when the mask's maximum is <= 1 (0/1 masks)."""
    if values.max(initial=0) <= 1:
        return values > 0
    return values > 127


def read_binary_mask(path: str | Path) -> np.ndarray:
    """A binary mask as (H, W) bool."""
    return binarize(read_mask_values(path))
