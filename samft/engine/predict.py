"""Prediction on new images: binary masks (0/255 PNG) at each image's original size, optional overlays."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from samft.data.classes import ClassSpec
from samft.data.layouts import Pair, distinct_names
from samft.data.io import is_image_name, read_image
from samft.engine.checkpoint import atomic_write_bytes
from samft.engine.evaluate import iter_predictions
from samft.engine.progress import progress
from samft.engine.runtime import pick_device, resolve_precision
from samft.engine.runs import is_run_file, load_run
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


def plan_outputs(files: list[Path], out: Path, with_overlay: bool, overwrite: bool) -> list[Pair]:
    """The input pairs with distinct output names, after checking that writing them loses nothing:
    no output lands on an input file (whatever ``overwrite`` says), and no existing file in ``out`` is
    replaced unless ``overwrite``. A SamftError naming the file otherwise."""
    if out.exists() and not out.is_dir():
        raise SamftError(f"{out}: --out is an existing file, not a folder; give a folder for the masks")
    pairs = [Pair(f, None, n) for f, n in zip(files, distinct_names(files))]
    renamed = [p for p in pairs if p.name != p.image.stem]
    if renamed:
        warnings.warn(f"{len(renamed)} input(s) share a file stem with another; their masks are named after their "
                      f"folders or extensions, e.g. {renamed[0].image} -> {renamed[0].name}.png", stacklevel=2)
    inputs = {f.resolve(): f for f in files}
    inodes = {(st.st_dev, st.st_ino): f for f in files for st in [f.stat()]}  # hard links too
    targets = [out / f"{p.name}.png" for p in pairs]
    if with_overlay:
        targets += [out / "overlays" / f"{p.name}.png" for p in pairs]
    clashes = []
    for target in targets:
        st = target.stat() if target.exists() else None
        same = inputs.get(target.resolve()) or (inodes.get((st.st_dev, st.st_ino)) if st else None)
        if same is not None:
            raise SamftError(f"{same}: --out {out} would write a mask onto this input image; "
                             f"choose another output folder")
        if is_run_file(target):
            raise SamftError(f"{target}: is a run's own file; samft predict never writes over it (choose another "
                             f"--out)")
        if target.exists() or target.is_symlink():
            clashes.append(target)
    if clashes and not overwrite:
        raise SamftError(f"{clashes[0]}: already exists in {out} ({len(clashes)} of the {len(targets)} output "
                         f"file(s) exist); pass --overwrite to replace them, or choose another --out")
    return pairs


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise SamftError(f"{path}: cannot write the prediction ({e.strerror or e})") from None


def predict_run(run_dir: str | Path, inputs: list[str], out_dir: Optional[str | Path] = None,
                with_overlay: bool = False, device: str = "auto", show_progress: bool = True,
                overwrite: bool = False) -> list[Path]:
    """Write ``out_dir/<name>.png`` for every input image; overlays go to ``out_dir/overlays/``.

    Names are the inputs' stems, made distinct (:func:`samft.data.layouts.distinct_names`); existing files
    are kept unless ``overwrite``, and an input image is never written to. Binary runs write 0/255 masks;
    multi-class runs write palette PNGs whose values are class ids.
    """
    files = collect_inputs(inputs)
    out = Path(out_dir) if out_dir else Path(run_dir) / "predictions"
    pairs = plan_outputs(files, out, with_overlay, overwrite)
    dev = pick_device(device)
    run = load_run(run_dir, dev)
    classes = ClassSpec.of(run.cfg.data)
    try:
        (out / "overlays" if with_overlay else out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SamftError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    precision = resolve_precision(run.cfg.train.precision, dev)
    written = []
    with progress("predict", len(pairs), show_progress) as advance:
        for pair, scores, _ in iter_predictions(run.model, pairs, run.cfg.eval.batch_size, dev, precision,
                                                run.cfg.data.num_workers, classes=classes):
            target = out / f"{pair.name}.png"
            if classes is None:
                mask = scores >= run.cfg.eval.threshold
                _write(target, _png_bytes(mask.astype(np.uint8) * 255))
                picture = overlay(read_image(pair.image), mask) if with_overlay else None
            else:
                labels = scores.argmax(0)
                _write(target, _png_bytes(label_image(labels, classes)))
                picture = class_overlay(read_image(pair.image), labels, classes) if with_overlay else None
            written.append(target)
            if picture is not None:
                _write(out / "overlays" / f"{pair.name}.png", _png_bytes(picture))
            advance()
    return written
