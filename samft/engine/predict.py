"""Prediction on new images: binary masks (0/255 PNG) at each image's original size, optional overlays."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from samft.data.classes import ClassSpec
from samft.data.layouts import Pair, unique_names
from samft.data.io import is_image_name, read_image
from samft.engine.checkpoint import atomic_write_bytes
from samft.engine.evaluate import iter_predictions
from samft.engine.progress import progress
from samft.engine.runtime import pick_device, resolve_precision
from samft.engine.runs import load_run
from samft.engine.tiling import check_tiling, iter_tiled_predictions
from samft.engine.writer import BackgroundWriter
from samft.errors import SamftError

OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns; each input must match something."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and is_image_name(f) and not f.name.startswith("."))
            if not files:
                raise SamftError(f"{p}: folder holds no images")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        elif any(ch in item for ch in "*?["):
            files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not files:
                raise SamftError(f"{item}: pattern matched no files")
            found.extend(files)
        else:
            raise SamftError(f"{item}: no such file, folder or pattern")
    seen, unique = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _png_bytes(image: np.ndarray | Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="PNG")
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


def label_image(labels: np.ndarray, classes: ClassSpec) -> Image.Image:
    """A label map as a palette PNG: pixel values are class ids, shown in the classes' colours."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(classes.palette_bytes())
    return im


def class_overlay(image: np.ndarray, labels: np.ndarray, classes: ClassSpec, alpha: float = 0.5) -> Image.Image:
    """The image blended with the class colours (background left as it is), with a legend of the classes shown."""
    from PIL import ImageDraw

    colours = classes.palette[labels]
    blend = image.astype(np.float32)
    fg = labels > 0
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
        draw.rectangle([w + 6, y, w + 20, y + 12], fill=tuple(int(v) for v in classes.palette[c]), outline=(0, 0, 0))
        draw.text((w + 26, y), classes.names[c], fill=(0, 0, 0))
    return canvas


def _write_prediction(target: Path, prediction: np.ndarray, classes: Optional[ClassSpec], image_path: Path,
                      overlays: Optional[Path]) -> None:
    """Encode and write one mask (and its overlay); runs on a writer thread."""
    if classes is None:
        atomic_write_bytes(target, _png_bytes(prediction.astype(np.uint8) * 255))
        picture = overlay(read_image(image_path), prediction) if overlays else None
    else:
        atomic_write_bytes(target, _png_bytes(label_image(prediction, classes)))
        picture = class_overlay(read_image(image_path), prediction, classes) if overlays else None
    if picture is not None:
        atomic_write_bytes(overlays / target.name, _png_bytes(picture))


def predict_run(run_dir: str | Path, inputs: list[str], out_dir: Optional[str | Path] = None,
                with_overlay: bool = False, device: str = "auto", show_progress: bool = True,
                tile: Optional[int] = None, overlap: Optional[int] = None, workers: Optional[int] = None,
                write_threads: int = 2) -> list[Path]:
    """Write ``out_dir/<name>.png`` for every input image; overlays go to ``out_dir/overlays/``.

    Binary runs write 0/255 masks; multi-class runs write palette PNGs whose values are class ids.
    ``tile``: predict each image by overlapping tiles of that many pixels at native resolution
    (``samft.engine.tiling``). ``workers``: image-decoding processes (default the run's
    ``data.num_workers``); ``write_threads``: threads encoding and writing the PNGs (0: in turn).
    """
    files = collect_inputs(inputs)
    overlap = check_tiling(tile, overlap) if tile else None
    dev = pick_device(device)
    run = load_run(run_dir, dev)
    classes = ClassSpec.of(run.cfg.data)
    out = Path(out_dir) if out_dir else Path(run_dir) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    if with_overlay:
        (out / "overlays").mkdir(exist_ok=True)
    pairs = unique_names([Pair(f, None, f.stem) for f in files])
    precision = resolve_precision(run.cfg.train.precision, dev)
    batch, workers = run.cfg.eval.batch_size, run.cfg.data.num_workers if workers is None else workers
    source = (iter_tiled_predictions(run.model, pairs, tile, overlap, batch, dev, precision, classes) if tile
              else iter_predictions(run.model, pairs, batch, dev, precision, workers, classes=classes))
    written = []
    with progress("predict", len(pairs), show_progress) as advance, BackgroundWriter(write_threads) as writer:
        for pair, scores, _ in source:
            target = out / f"{pair.name}.png"
            prediction = scores >= run.cfg.eval.threshold if classes is None else scores.argmax(0)
            writer.submit(_write_prediction, target, prediction, classes, pair.image,
                          out / "overlays" if with_overlay else None)
            written.append(target)
            advance()
    return written
