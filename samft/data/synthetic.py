"""A synthetic binary-segmentation dataset for a first run: textured ellipses on cluttered backgrounds.

Images have varied, non-square sizes (so evaluation at the original resolution is exercised); the mask
is the ellipses only, not the rectangles drawn as distractors.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from samft.files import atomic_write_bytes
from samft.errors import SamftError


def make_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 {0, 255} mask."""
    h, w = (int(v) for v in rng.integers(112, 193, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    image += rng.normal(0, 12, size=(h, w, 3))
    for _ in range(int(rng.integers(0, 3))):  # distractors: not in the mask
        y0, x0 = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
        y1, x1 = y0 + int(rng.integers(10, 40)), x0 + int(rng.integers(10, 40))
        image[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        center = (int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5)))
        axes = (int(rng.integers(10, w // 3)), int(rng.integers(10, h // 3)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    fg = mask > 0
    colour = (base + rng.choice([-1, 1], size=3) * rng.uniform(50, 90, size=3)) % 255
    image[fg] = colour + rng.normal(0, 20, size=(int(fg.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_dataset(out_dir: str | Path, n: int = 64, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``n`` pairs to ``out_dir/images/NNNN.png`` and ``out_dir/masks/NNNN.png``; existing files of
    those names are refused (a SamftError naming the first) unless ``overwrite``."""
    out = Path(out_dir)
    names = [f"{i:04d}.png" for i in range(n)]
    targets = [out / sub / name for name in names for sub in ("images", "masks")]
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        raise SamftError(f"{existing[0]}: already exists ({len(existing)} of the {len(targets)} files to write); "
                         f"replace them with --overwrite (overwrite=True from Python), or choose another folder")
    rng = np.random.default_rng(seed)
    try:
        for name in names:
            image, mask = make_sample(rng)
            atomic_write_bytes(out / "images" / name, _png(image))
            atomic_write_bytes(out / "masks" / name, _png(mask))
    except OSError as e:
        raise SamftError(f"{out}: cannot write the dataset ({e.strerror or e})") from None
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
