"""Prediction on new images: binary masks (0/255 PNG) at each image's original size, optional overlays."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from samft.data.layouts import Pair, distinct_names
from samft.data.io import is_image_name, read_image
from samft.data import split_file
from samft.data.paths import expand_glob
from samft.engine import distributed as D
from samft.engine.artifacts.fileio import atomic_write_bytes
from samft.files import sync_dir
from samft.engine.infer.evaluate import predictions
from samft.engine.runtime import memory_advice, resolve_precision
from samft.engine.artifacts.rundir import RunDir, is_run_file
from samft.engine.artifacts.loading import load_run, run_device
from samft.engine.infer.tiling import check_tiling, inference_memory
from samft.engine.infer.writer import BackgroundWriter
from samft.errors import SamftError
from samft.progress import console, progress
from samft.data.draw import class_overlay, label_image, mask_png, overlay, overlay_png  # noqa: F401  (re-exported)
from samft.data.draw import npy_bytes, png16_bytes
from samft.tasks.task import Task, make_task


class Written(list):
    """The paths of the masks :func:`predict_run` wrote, with ``predict_seconds``: the time from the first batch to
    the last file written (this process's share), start-up and model loading left out."""

    predict_seconds: float = 0.0


def _pattern_files(pattern: str) -> list[Path]:
    files, loops = expand_glob(pattern)
    if loops:
        warnings.warn(f"{pattern}: {len(loops)} link(s) to a folder that leads back to itself not followed "
                      f"(e.g. {loops[0]})", stacklevel=3)
    return files


def split_inputs(run_dir: str | Path, split: str) -> list[str]:
    """The images of one split of a run (``val`` or ``train``, as its ``split.json`` lists them)."""
    run = RunDir(run_dir)
    if Path(run_dir).is_file() or not run.split_path.is_file():
        raise SamftError(f"--split {split}: {run_dir} has no split.json (an exported model or a run of an earlier "
                         f"version): give the images instead")
    listed = split_file.read(run.split_path)
    if split not in listed:
        raise SamftError(f"--split {split}: {run.split_path} lists {', '.join(sorted(listed))}")
    return [img for img, _ in listed[split]]


def _folder_images(folder: Path) -> list[Path]:
    """A folder's image files, sorted; entries with an image name that are no regular file (a FIFO, a device, a
    link to nothing) are skipped and said in one warning."""
    named = sorted(f for f in folder.iterdir() if is_image_name(f) and not f.name.startswith("."))
    files = [f for f in named if f.is_file()]
    if len(files) < len(named):
        odd = [f for f in named if not f.is_file()]
        warnings.warn(f"{folder}: {len(odd)} entr(y/ies) named like images skipped: not regular files (a link to "
                      f"nothing, a FIFO or a device), e.g. {odd[0].name}", stacklevel=3)
    if not files:
        raise SamftError(f"{folder}: folder holds no images")
    return files


def _one_input(item: str) -> list[Path]:
    p = Path(item).expanduser()
    if p.is_dir():
        return _folder_images(p)
    if p.is_file():
        return [p]
    if any(ch in item for ch in "*?["):
        files = _pattern_files(str(p))
        if not files:
            raise SamftError(f"{item}: pattern matched no files")
        return files
    if p.exists():
        raise SamftError(f"{item}: not a regular file (a FIFO, a device or a socket); give image files")
    if p.is_symlink():
        raise SamftError(f"{item}: a link to nothing ({os.readlink(p)})")
    raise SamftError(f"{item}: no such file, folder or pattern")


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns; each input must match something."""
    found: list[Path] = [f for item in inputs for f in _one_input(item)]
    seen, unique = set(), []
    for f in found:
        key = Path(os.path.abspath(f))  # as given: two links to one file are two inputs, named after each link
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _input_index(files: list[Path]) -> tuple[dict[Path, Path], dict[tuple[int, int], Path]]:
    """The inputs by resolved path and by (device, inode) (hard links too): what no output may land on."""
    return {f.resolve(): f for f in files}, {(st.st_dev, st.st_ino): f for f in files for st in [f.stat()]}


def _check_target(target: Path, out: Path, inputs: dict[Path, Path], inodes: dict[tuple[int, int], Path]) -> bool:
    """Refuses a target that is an input image (by path or hard link) or a run's own file; True if it exists."""
    st = target.stat() if target.exists() else None
    same = inputs.get(target.resolve()) or (inodes.get((st.st_dev, st.st_ino)) if st else None)
    if same is not None:
        raise SamftError(f"{same}: --out {out} would write a mask onto this input image; choose another output folder")
    if is_run_file(target):
        raise SamftError(f"{target}: is a run's own file; samft predict never writes over it (choose another --out)")
    return target.exists() or target.is_symlink()


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
    inputs, inodes = _input_index(files)
    targets = [out / f"{p.name}.png" for p in pairs]
    if with_overlay:
        targets += [out / "overlays" / f"{p.name}.png" for p in pairs]
    clashes = [target for target in targets if _check_target(target, out, inputs, inodes)]
    if clashes and not overwrite:
        raise SamftError(f"{clashes[0]}: already exists in {out} ({len(clashes)} of the {len(targets)} output "
                         f"file(s) exist); pass --overwrite to replace them, or choose another --out")
    return pairs


PROBS_FORMATS = ("npy", "png16")
PROBS_FOLDER = "probs"


def check_probs(probs: Optional[str], tile: Optional[int], task: Optional[Task] = None) -> None:
    """``--probs``: npy or png16; with ``--tile`` only where tiled prediction keeps the scores (binary: a
    multi-class run's tiled prediction decides band by band and never holds C x H x W scores)."""
    if probs is not None and probs not in PROBS_FORMATS:
        raise SamftError(f"--probs {probs}: expected npy or png16")
    if probs and tile and task is not None and task.decides_in_bands:
        raise SamftError("--probs with --tile: a multi-class run's tiled prediction keeps no class scores (it decides "
                         "band by band to bound memory); drop --tile or --probs")


def probs_targets(out: Path, name: str, probs: str, num_classes: Optional[int]) -> list[Path]:
    """The probability files of one image in ``out/probs``: ``NAME.npy`` (binary (H, W), multi-class (C, H, W));
    png16: ``NAME.png`` (binary) or ``NAME/<class id>.png``, one per class (multi-class, ``num_classes``)."""
    folder = out / PROBS_FOLDER
    if probs == "npy":
        return [folder / f"{name}.npy"]
    if num_classes is None:
        return [folder / f"{name}.png"]
    return [folder / name / f"{k}.png" for k in range(num_classes)]


def plan_probs(pairs: list[Pair], out: Path, probs: Optional[str], task: Task, overwrite: bool) -> None:
    """The probability files refused as the masks are (:func:`plan_outputs`): never onto an input image or a
    run's file, an existing file only with ``overwrite``."""
    if not probs:
        return
    num_classes = task.num_classes if task.classes is not None else None
    targets = [t for p in pairs for t in probs_targets(out, p.name, probs, num_classes)]
    inputs, inodes = _input_index([p.image for p in pairs])
    clashes = [t for t in targets if _check_target(t, out, inputs, inodes)]
    if clashes and not overwrite:
        raise SamftError(f"{clashes[0]}: already exists in {out} ({len(clashes)} of the {len(targets)} probability "
                         f"file(s) exist); pass --overwrite to replace them, or choose another --out")


def probability_files(scores: np.ndarray, task: Task, probs: str) -> list[tuple[str, bytes]]:
    """(name under ``probs/`` without the image's name, bytes) of one image's scores: ``.npy`` float16 of the
    scores as they are; png16 of the foreground probability, or of each class's share of the class scores
    (the scores divided by their sum over the classes: a distribution per pixel with the same argmax)."""
    if probs == "npy":
        return [(".npy", npy_bytes(scores))]
    if task.classes is None:
        return [(".png", png16_bytes(scores))]
    share = scores / np.maximum(scores.sum(axis=0, keepdims=True), np.finfo(np.float32).tiny)
    return [(f"/{k}.png", png16_bytes(share[k])) for k in range(share.shape[0])]


def default_output(run: Path) -> Path:
    """``RUN/predictions``, or ``MODEL-predictions`` next to an exported model file."""
    return run.with_name(run.stem + "-predictions") if run.is_file() else run / "predictions"


def _write(path: Path, data: bytes, folders: set[Path]) -> None:
    """Write one prediction file atomically; its folder joins ``folders``, fsynced once each at the end
    (:func:`_write_all`) rather than after every file."""
    try:
        atomic_write_bytes(path, data, sync_folder=False)
    except OSError as e:
        raise SamftError(f"{path}: cannot write the prediction ({e.strerror or e})") from None
    folders.add(path.parent)


def _write_prediction(task: Task, target: Path, labels: np.ndarray, image_path: Path, overlays: Optional[Path],
                      scores: Optional[np.ndarray], probs: Optional[str], folders: set[Path]) -> None:
    """Encode and write one mask (its overlay, its probability files)."""
    _write(target, mask_png(labels, task.classes), folders)
    if overlays is not None:
        _write(overlays / target.name, overlay_png(read_image(image_path), labels, task.classes), folders)
    if probs:
        for suffix, data in probability_files(scores, task, probs):
            _write(target.parent / PROBS_FOLDER / f"{target.stem}{suffix}", data, folders)


def predict_run(run_dir: str | Path, inputs: list[str], out_dir: Optional[str | Path] = None,
                with_overlay: bool = False, device: str = "auto", show_progress: bool = True,
                overwrite: bool = False, tile: Optional[int] = None, overlap: Optional[int] = None,
                workers: Optional[int] = None, write_threads: int = 2, probs: Optional[str] = None) -> list[Path]:
    """Write ``out_dir/<name>.png`` for every input image; overlays go to ``out_dir/overlays/``.

    Names are the inputs' stems, made distinct (:func:`samft.data.layouts.distinct_names`); existing files
    are kept unless ``overwrite``, and an input image is never written to. Binary runs write 0/255 masks;
    multi-class runs write palette PNGs whose values are class ids. ``tile``: predict each image by
    overlapping tiles of that many pixels at native resolution (``samft.engine.infer.tiling``). ``workers``:
    image-decoding processes (default the run's ``data.num_workers``); ``write_threads``: threads encoding
    and writing the PNGs (0: in turn). ``probs`` (``npy`` or ``png16``): also the probability maps, into
    ``out_dir/probs/`` (:func:`probs_targets`, :func:`probability_files`), refused as the masks are; with
    ``tile`` for binary runs only.

    Under ``torchrun`` every process checks the same plan (nothing is written until all have), then
    predicts and writes its share of the images (each image once, on its own GPU); every process returns
    the paths of all the masks written.
    """
    with D.distributed(device) as info, memory_advice(*inference_memory(tile)):
        return _predict_run(run_dir, inputs, out_dir, with_overlay, D.device_for(info, run_device(run_dir, device)),
                            show_progress, overwrite, tile, overlap, workers, write_threads, info, probs)


def _prepare_output(out: Path, with_overlay: bool, probs: Optional[str] = None) -> None:
    try:
        (out / "overlays" if with_overlay else out).mkdir(parents=True, exist_ok=True)
        if probs:
            (out / PROBS_FOLDER).mkdir(exist_ok=True)
    except OSError as e:
        raise SamftError(f"{out}: cannot create the output folder ({e.strerror or e})") from None


def _predict_one(task: Task, compute, target: Path, image_path: Path, overlays: Optional[Path],
                 probs: Optional[str], folders: set[Path]) -> tuple[bool, Optional[np.ndarray]]:
    """One image: its scores at its own size (``compute``), decided and written; returns whether the mask is
    empty and (multi-class) the predicted pixels per class."""
    scores = compute()
    labels = task.labels(scores)
    _write_prediction(task, target, labels, image_path, overlays, scores if probs else None, probs, folders)
    if task.classes is None:
        return task.is_empty(labels), None
    return task.is_empty(labels), np.bincount(labels.ravel().astype(np.int64), minlength=task.num_classes)[
        :task.num_classes]


def _predict_chunk(jobs: list[tuple]) -> list[tuple[bool, Optional[np.ndarray]]]:
    return [_predict_one(*job) for job in jobs]


# Images per writer job, and jobs waiting at most: a job per image cost the model's thread a wake-up of a
# writer each (200 demo images: 1.55-1.65x the bare forward instead of 1.48-1.52x); 4 jobs of 8 hold the
# outputs of at most two batches of 16.
CHUNK, PENDING = 8, 4


def _write_all(source, task: Task, out: Path, with_overlay: bool, total: int, show: bool,
               write_threads: int, probs: Optional[str] = None) -> tuple[int, np.ndarray]:
    """Resize, decide and write every prediction of ``source`` (deferred scores, :func:`predictions`) on writer
    threads while the model computes the next batch (``probs``: the probability files too); then fsync the
    folders written. Returns how many masks were empty and the predicted pixels per class (multi-class; empty
    for binary)."""
    done, chunk, folders = [], [], set()
    try:
        with progress("predict", total, show) as advance, BackgroundWriter(write_threads, PENDING) as writer:
            try:
                for pair, compute, _ in source:
                    chunk.append((task, compute, out / f"{pair.name}.png", pair.image,
                                  out / "overlays" if with_overlay else None, probs, folders))
                    if len(chunk) == CHUNK:
                        done.append(writer.submit(_predict_chunk, chunk))
                        chunk = []
                    advance()
            except KeyboardInterrupt:  # what the model computed before Ctrl-C is still written (the writer finishes it)
                if chunk:
                    writer.submit(_predict_chunk, chunk)
                raise
            if chunk:
                done.append(writer.submit(_predict_chunk, chunk))
    finally:
        for folder in sorted(folders):
            sync_dir(folder)
    results = [r for d in done for r in d.result()]
    counts = np.zeros(task.num_classes if task.classes is not None else 0, dtype=np.int64)
    for _, c in results:
        if c is not None:
            counts += c
    return sum(int(e) for e, _ in results), counts


COLLAPSE_SHARE, COLLAPSE_IMAGES = 0.995, 3


def _collapse_warning(counts: np.ndarray, images: int, task: Task) -> None:
    """Multi-class: one class over 99.5 % of every predicted pixel of 3 or more images is a collapse, said once."""
    if len(counts) and images >= COLLAPSE_IMAGES and counts.sum():
        top = int(np.argmax(counts))
        share = counts[top] / counts.sum()
        if share > COLLAPSE_SHARE:
            warnings.warn(f"{100 * share:.1f} % of the predicted pixels of all {images} images are "
                          f"{task.classes.names[top]!r}: the model may have collapsed to one class; check the run's "
                          f"validation mIoU and mAcc (1/{len(counts)} = {1 / len(counts):.3f} is chance)", stacklevel=3)


def _predict_run(run_dir: str | Path, inputs: list[str], out_dir: Optional[str | Path], with_overlay: bool,
                 dev, show_progress: bool, overwrite: bool, tile: Optional[int], overlap: Optional[int],
                 workers: Optional[int], write_threads: int, info: D.DistInfo, probs: Optional[str] = None
                 ) -> list[Path]:
    files = collect_inputs(inputs)
    overlap = check_tiling(tile, overlap)
    check_probs(probs, tile)
    out = Path(out_dir) if out_dir else default_output(Path(run_dir))
    pairs = plan_outputs(files, out, with_overlay, overwrite)
    run = load_run(run_dir, dev)
    task = make_task(run.cfg)
    check_probs(probs, tile, task)
    plan_probs(pairs, out, probs, task, overwrite)
    D.barrier(info)  # every process has checked the plan before any writes
    _prepare_output(out, with_overlay, probs)
    mine = D.shard(pairs, info)
    precision = resolve_precision(run.cfg.train.precision, dev)
    source = predictions(run.model, mine, run.cfg, dev, task, precision, (tile, overlap) if tile else None, workers,
                         "data.num_workers" if workers is None else "--workers", at_input_size=False, deferred=True)
    started = time.perf_counter()
    empty, counts = _write_all(source, task, out, with_overlay, len(mine), show_progress and info.is_main,
                               write_threads, probs)
    shares = D.gather_objects((len(mine), empty, counts), info)  # also waits until every process has written
    written = Written(out / f"{p.name}.png" for p in pairs)
    written.predict_seconds = time.perf_counter() - started
    if info.is_main:
        _report(shares, written, task, info, run.cfg.eval.threshold)
    return written


def _report(shares: list, written: list[Path], task: Task, info: D.DistInfo, threshold: float) -> None:
    """Rank 0: how the processes shared the images; a collapse to one class; masks that are all empty."""
    if info.enabled:
        console.print(f"predicted by {info.world_size} processes: {' + '.join(str(n) for n, _, _ in shares)} images")
    _collapse_warning(sum(c for _, _, c in shares), len(written), task)
    if written and sum(e for _, e, _ in shares) == len(written):
        warnings.warn(f"every one of the {len(written)} predicted masks is empty: the run may have learnt nothing; "
                      f"check its metrics.csv (and eval.threshold {threshold})", stacklevel=3)
