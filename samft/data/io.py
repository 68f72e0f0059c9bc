"""Reading images and masks, with errors that name the file.

A corrupt or truncated file is an error, never a black image or an empty mask.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from typing import Optional

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from samft.errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode as partly black

PIXELS_ENV = "SAMFT_MAX_IMAGE_PIXELS"  # images you trust may be larger than Pillow's guard (e.g. for --tile)


def pixel_limit() -> Optional[int]:
    """``SAMFT_MAX_IMAGE_PIXELS`` (a positive integer) when set: the largest image, in pixels, samft decodes in
    place of Pillow's decompression-bomb guard (which refuses over twice its ``MAX_IMAGE_PIXELS``, ~179 M).
    An environment variable, so the DataLoader's worker processes see it too."""
    text = os.environ.get(PIXELS_ENV)
    if text is None or text.strip() == "":
        return None
    try:
        limit = int(text.replace("_", ""))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise DataError(f"{PIXELS_ENV}={text!r}: expected a positive number of pixels, e.g. 1000000000")
    return limit


def _check_pixels(path: Path, what: str, im: Image.Image, limit: int) -> None:
    if im.width * im.height > limit:
        raise DataError(f"{path}: the {what} has {im.width * im.height:,} pixels, over {PIXELS_ENV}={limit:,}; "
                        f"raise it if you trust the file")


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_MULTI_FRAME_WARNED: list[bool] = [False]


def _warn_multi_frame(path: Path, what: str, frames: int) -> None:
    """Animated GIF/PNG/WebP and multi-page TIFF: samft reads the first frame; said once per process."""
    if not _MULTI_FRAME_WARNED[0]:
        _MULTI_FRAME_WARNED[0] = True
        warnings.warn(f"{path}: the {what} has {frames} frames (animated or multi-page); samft uses the first "
                      f"frame of every such file (said once)", stacklevel=4)


_GUARD_LOCK = threading.Lock()


def _opened(path: Path, limit: Optional[int]) -> Image.Image:
    """``Image.open``; with ``limit`` set, without Pillow's own guard (``_check_pixels`` is the guard then)."""
    if limit is None:
        return Image.open(path)
    with _GUARD_LOCK, warnings.catch_warnings():  # writer threads read images too: one swap at a time
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path, what: str) -> tuple[Image.Image, Optional[Image.Transpose], tuple[int, int]]:
    """Decode a file fully (its first frame); apply its EXIF orientation. Returns (image, transpose applied,
    raw (h, w))."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    limit = pixel_limit()
    try:
        with _opened(path, limit) as im:
            if limit is not None:
                _check_pixels(path, what, im, limit)
            if getattr(im, "n_frames", 1) > 1:
                _warn_multi_frame(path, what, im.n_frames)
            im.load()
            raw_hw = (im.height, im.width)
            method = EXIF_TRANSPOSE.get(im.getexif().get(ExifTags.Base.Orientation, 1))
            out = ImageOps.exif_transpose(im)  # camera rotation: pixels as a viewer shows them
            out.load()
            return out, method, raw_hw
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels, " if found else ""
        raise DataError(f"{path}: the {what} is not corrupt but too large to decode ({size}over Pillow's limit of "
                        f"{Image.MAX_IMAGE_PIXELS or 0:,}, a guard against decompression bombs); shrink or cut it "
                        f"first, or set {PIXELS_ENV}=N (pixels) if you trust it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
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


def _image_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = _to_uint8(np.array(im))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def read_image(path: str | Path) -> np.ndarray:
    """An image as (H, W, 3) uint8 RGB: grey is repeated, alpha dropped, 16-bit scaled, EXIF applied."""
    return _image_array(_open(Path(path), "image")[0])


def read_image_oriented(path: str | Path) -> tuple[np.ndarray, Optional[Image.Transpose], tuple[int, int]]:
    """Like :func:`read_image`, also returning the EXIF transpose applied and the stored (h, w)."""
    im, method, raw_hw = _open(Path(path), "image")
    return _image_array(im), method, raw_hw


def _mask_array(im: Image.Image) -> np.ndarray:
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


def read_mask_values(path: str | Path) -> np.ndarray:
    """A mask's raw values as (H, W): palette indices for 'P' images, grey levels otherwise.

    RGB(A) masks are converted to grey (luminance); 16-bit masks keep their values.
    """
    return _mask_array(_open(Path(path), "mask")[0])


def read_mask_for_image(path: str | Path, image_transpose: Optional[Image.Transpose], image_raw_hw: tuple[int, int],
                        convert=None) -> np.ndarray:
    """A mask kept aligned with an image whose EXIF orientation was applied.

    Masks are drawn on the stored pixels by most tools, so a mask of the image's stored size gets the
    image's EXIF transpose too; a mask that carries its own orientation, or already has the displayed
    size (a 90-degree rotation it was drawn after), is used as it is. ``convert`` turns the decoded
    PIL mask into an array (default: its raw values, see :func:`read_mask_values`).
    """
    im, own_method, raw_hw = _open(Path(path), "mask")
    if image_transpose is not None and own_method is None and raw_hw == tuple(image_raw_hw):
        im = im.transpose(image_transpose)
    return (convert or _mask_array)(im)


def binarize(values: np.ndarray) -> np.ndarray:
    """Foreground where the value is > 127, or > 0 when the mask's maximum is <= 1 (0/1 masks)."""
    if values.max(initial=0) <= 1:
        return values > 0
    return values > 127


def checked_binary(values: np.ndarray, path: str | Path) -> np.ndarray:
    """``values`` of the mask ``path`` as (H, W) bool; a DataError naming the file if they are no binary mask."""
    problem = binary_mask_problem(values)
    if problem:
        raise DataError(f"{path}: {problem}")
    return binarize(values)


def read_binary_mask(path: str | Path) -> np.ndarray:
    """A binary mask as (H, W) bool, checked as :func:`checked_binary` does."""
    return checked_binary(read_mask_values(path), path)


def binary_mask_problem(values: np.ndarray) -> Optional[str]:
    """Why ``values`` is not a usable binary mask, or None.

    Accepted: 0/1 masks, 0/255-like masks (noisy JPEG edges included), 16-bit 0/65535. Refused: masks
    whose foreground could only be small class ids (max 2..127: nothing would pass the > 127 rule) and
    masks with many mid-grey values (a photo or a soft map, not a mask).
    """
    top = int(values.max(initial=0))
    if top <= 1:
        return None
    if top <= 127:
        shown = np.unique(values)[:6].tolist()
        return (f"values {shown} look like class ids, not a binary mask (foreground must be > 127, or 1 in a 0/1 "
                f"mask)")
    v = values.astype(np.float64) * (255.0 / 65535.0) if top > 255 else values
    ambiguous = float(np.mean((v >= 32) & (v <= 223)))
    if ambiguous > 0.05:
        return f"{ambiguous:.0%} of the pixels are mid-grey (32..223): not a binary mask"
    return None
