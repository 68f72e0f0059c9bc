"""Prediction on new images: binary masks (0/255 PNG) at each image's original size, optional overlays."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Optional

from samft.data.layouts import Pair, unique_names
from samft.data.io import is_image_name, read_image
from samft.engine.checkpoint import atomic_write_bytes
from samft.engine.evaluate import iter_predictions
from samft.engine.runtime import pick_device, resolve_precision
from samft.engine.runs import load_run
from samft.errors import SamftError
from samft.progress import progress
from samft.tasks import class_overlay, label_image, make_task, overlay  # noqa: F401  (re-exported)


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


def predict_run(run_dir: str | Path, inputs: list[str], out_dir: Optional[str | Path] = None,
                with_overlay: bool = False, device: str = "auto", show_progress: bool = True) -> list[Path]:
    """Write ``out_dir/<name>.png`` for every input image; overlays go to ``out_dir/overlays/``.

    Binary runs write 0/255 masks; multi-class runs write palette PNGs whose values are class ids.
    """
    files = collect_inputs(inputs)
    dev = pick_device(device)
    run = load_run(run_dir, dev)
    task = make_task(run.cfg)
    out = Path(out_dir) if out_dir else Path(run_dir) / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    if with_overlay:
        (out / "overlays").mkdir(exist_ok=True)
    pairs = unique_names([Pair(f, None, f.stem) for f in files])
    precision = resolve_precision(run.cfg.train.precision, dev)
    written, empty = [], 0
    with progress("predict", len(pairs), show_progress) as advance:
        for pair, scores, _ in iter_predictions(run.model, pairs, run.cfg.eval.batch_size, dev, task, precision,
                                                run.cfg.data.num_workers, resize=run.cfg.data.resize):
            target = out / f"{pair.name}.png"
            labels = task.labels(scores)
            atomic_write_bytes(target, task.mask_png(labels))
            written.append(target)
            empty += int(task.is_empty(labels))
            if with_overlay:
                atomic_write_bytes(out / "overlays" / f"{pair.name}.png",
                                   task.overlay_png(read_image(pair.image), labels))
            advance()
    if written and empty == len(written):
        warnings.warn(f"every one of the {len(written)} predicted masks is empty: the run may have learnt nothing; "
                      f"check its metrics.csv (and eval.threshold {run.cfg.eval.threshold})")
    return written
