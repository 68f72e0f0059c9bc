"""Checking every split before a long run: ``samft data check`` and the start of ``samft train``.

The images of ``data.unlabelled`` are checked too (as the split ``unlabelled``: images only).

``full`` decodes every image and mask (corrupt or truncated files, size mismatches, masks that are not
binary); ``quick`` lists the pairs and reads image headers only. Every problem is reported with the
file it concerns; the check does not stop at the first one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
import torch
from torch.utils.data import DataLoader, Dataset

from samft.config import Config, DataConfig
from samft.data.classes import ClassSpec
from samft.data.datasets import load_pair
from samft.data.io import read_image, read_mask_values
from samft.data.layouts import Layout, Pair, list_images, named_test_splits, split_pairs, train_val_pairs
from samft.data.unlabelled import unlabelled_images
from samft.data.workers import cap_workers
from samft.progress import progress
from samft.errors import SamftError


@dataclass
class SplitReport:
    name: str
    pairs: int = 0
    image_sizes: Counter = field(default_factory=Counter)  # (w, h) -> count
    mask_values: Counter = field(default_factory=Counter)  # raw mask value -> pixel count (full check)
    foreground: list = field(default_factory=list)  # foreground fraction per mask (full check)
    problems: list = field(default_factory=list)
    class_names: tuple = ()  # multi-class: mask values are class ids, shown by name

    def sizes_text(self) -> str:
        if not self.image_sizes:
            return "-"
        if len(self.image_sizes) == 1:
            (w, h), = self.image_sizes
            return f"all {w}x{h}"
        areas = sorted(self.image_sizes, key=lambda s: s[0] * s[1])
        return f"{len(self.image_sizes)} sizes, {areas[0][0]}x{areas[0][1]} .. {areas[-1][0]}x{areas[-1][1]}"

    def values_text(self, top: int = 4) -> str:
        total = sum(self.mask_values.values())
        if not total:
            return "-"
        if self.class_names:  # every class's share of the pixels, by name
            names = dict(enumerate(self.class_names))
            return ", ".join(f"{names.get(v, f'id {v}')}: {n / total:.1%}" for v, n in sorted(self.mask_values.items()))
        common = self.mask_values.most_common(top)
        rest = len(self.mask_values) - len(common)
        text = ", ".join(f"{v}: {n / total:.1%}" for v, n in sorted(common))
        return text + (f" (+{rest} other values)" if rest else "")

    def as_dict(self) -> dict:
        return {"pairs": self.pairs, "image_sizes": self.sizes_text(), "mask_values": self.values_text(),
                "foreground_mean": float(np.mean(self.foreground)) if self.foreground else None,
                "problems": list(self.problems)}


@dataclass
class DataReport:
    splits: list[SplitReport]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts worth a line (how the train/val split is made)

    @property
    def problems(self) -> list[str]:
        return [p for s in self.splits for p in s.problems]

    def as_dict(self) -> dict:
        return {"splits": {s.name: s.as_dict() for s in self.splits}, "warnings": self.warnings,
                "notes": self.notes, "ok": not self.problems}


class _CheckDataset(Dataset):
    """Per pair: (w, h), mask value counts, foreground fraction, or the problem found."""

    def __init__(self, pairs: list[Pair], full: bool, classes: Optional[ClassSpec] = None) -> None:
        self.pairs, self.full, self.classes = pairs, full, classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        try:
            if pair.mask is None:  # an unlabelled image (data.unlabelled)
                return {"size": _image_size(pair.image, self.full)}
            if self.full:
                image, mask = load_pair(pair, self.classes)
                raw = mask if self.classes else read_mask_values(pair.mask)  # class ids, or the binary mask's values
                values, counts = np.unique(raw, return_counts=True)
                item = {"size": (image.shape[1], image.shape[0]), "values": dict(zip(values.tolist(), counts.tolist()))}
                background = 0 if self.classes is None else self.classes.background
                if background is not None:  # no background class: "foreground" means nothing
                    ignore = -1 if self.classes is None else self.classes.ignore_index
                    item["fg"] = float(((mask != background) & (mask != ignore)).mean())
                return item
            with Image.open(pair.image) as im:
                size = im.size
            if not Path(pair.mask).is_file():
                return {"problem": f"{pair.mask}: mask not found"}
            with Image.open(pair.mask) as m:
                if m.size != size:
                    return {"problem": f"{pair.mask}: mask size {m.size[0]}x{m.size[1]} differs from its image "
                                       f"{pair.image} ({size[0]}x{size[1]})"}
            return {"size": size}
        except SamftError as e:
            return {"problem": str(e)}
        except (OSError, ValueError, SyntaxError) as e:
            return {"problem": f"{pair.image}: cannot read ({e})"}


def _image_size(path: Path, full: bool) -> tuple[int, int]:
    """(w, h) of an image: decoded in full (as training reads it), else from its header."""
    if full:
        image = read_image(path)
        return image.shape[1], image.shape[0]
    with Image.open(path) as im:
        return im.size


def _check_pairs(report: SplitReport, pairs: list[Pair], full: bool, workers: int, show_progress: bool,
                 classes: Optional[ClassSpec] = None) -> None:
    report.pairs = len(pairs)
    report.class_names = classes.names if classes is not None else ()
    loader = DataLoader(_CheckDataset(pairs, full, classes), batch_size=None,
                        num_workers=cap_workers(workers, len(pairs), option=None))  # capped in silence
    with progress(f"check {report.name}", len(pairs), show_progress) as advance:
        for item in loader:
            if "problem" in item:
                report.problems.append(item["problem"])
            else:
                report.image_sizes[tuple(item["size"])] += 1
                report.mask_values.update(item.get("values", {}))
                if "fg" in item:
                    report.foreground.append(item["fg"])
            advance()


def _listed(report: SplitReport, load) -> Optional[list[Pair]]:
    try:
        pairs = load()
    except SamftError as e:
        report.problems.append(str(e))
        return None
    if not pairs:
        report.problems.append(f"split {report.name} is empty")
        return None
    return pairs


def orphan_masks(data: DataConfig, spec: str) -> Optional[str]:
    """The problem of a folder split holding masks that no image pairs with (an image deleted, misnamed or
    in another format's folder), naming the first; None when every mask has its image. CSV and VOC lists
    name their pairs, so their folders may hold other splits' masks and are not checked."""
    layout = Layout.of(data)
    if layout.format in ("voc", "csv") or spec.endswith(".csv"):
        return None
    if "::" in spec:
        image_spec, mask_spec = spec.split("::", 1)
        image_folder, mask_folder = layout.path(image_spec), layout.path(mask_spec)
    else:
        image_folder, mask_folder = layout.path(spec) / layout.image_dir, layout.path(spec) / layout.mask_dir
    try:
        images = list_images(image_folder, "image", layout)
        if image_folder.resolve() == mask_folder.resolve():
            suffix = layout.mask_suffix.lower()
            masks = [p for p in images if suffix and p.stem.lower().endswith(suffix)]
            images = [p for p in images if not (suffix and p.stem.lower().endswith(suffix))]
        else:
            masks = list_images(mask_folder, "mask", layout)
    except SamftError:
        return None  # the split's own listing reports it
    wanted = {(p.stem + layout.mask_suffix).lower() for p in images}
    orphans = [m for m in masks if m.stem.lower() not in wanted]
    if not orphans:
        return None
    stem = orphans[0].stem[:len(orphans[0].stem) - len(layout.mask_suffix)] if layout.mask_suffix else orphans[0].stem
    return (f"{orphans[0]}: mask without an image (looked for {image_folder / stem}.* with any image extension); "
            f"{len(orphans)} of {len(masks)} masks in {mask_folder} have no image")


def check_data(cfg: Config, mode: Optional[str] = None, show_progress: bool = True) -> DataReport:
    """Check the training, validation and test splits of ``cfg`` (``mode``: full or quick)."""
    mode = mode or cfg.data.check
    full = mode == "full"
    workers = cfg.data.num_workers
    classes = ClassSpec.of(cfg.data)
    layout = Layout.of(cfg.data)
    reports: list[SplitReport] = []
    train_names: set = set()

    train_report = SplitReport("train")
    split = _listed(train_report, lambda: train_val_pairs(cfg.data))
    reports.append(train_report)
    notes = []
    if split is not None:
        train, val = split
        everything = train + val if not layout.val else train
        if cfg.data.split_file:
            notes.append(f"split from {cfg.data.split_file}: {len(train)} train / {len(val)} val images")
        elif not layout.val:
            notes.append(f"the train split's {len(everything)} pairs: {len(train)} train / {len(val)} val, held out at "
                         f"random (data.val_fraction {cfg.data.val_fraction}, data.split_seed {cfg.data.split_seed})")
        train_names = {p.image.resolve() for p in everything}
        _check_pairs(train_report, everything, full, workers, show_progress, classes)
        _report_orphans(train_report, cfg.data, layout.train)
        if layout.val:
            val_report = SplitReport("val")
            reports.append(val_report)
            _check_pairs(val_report, val, full, workers, show_progress, classes)
            _report_orphans(val_report, cfg.data, layout.val)
    warnings = []
    for name, spec in named_test_splits(cfg.data).items():
        report = SplitReport(f"test:{name}")
        reports.append(report)
        pairs = _listed(report, lambda spec=spec: split_pairs(cfg.data, spec))
        if pairs is None:
            continue
        _check_pairs(report, pairs, full, workers, show_progress, classes)
        _report_orphans(report, cfg.data, spec)
        shared = sum(p.image.resolve() in train_names for p in pairs)
        if shared:
            warnings.append(f"test set {name} shares {shared} of its {len(pairs)} images with the training split")
    if cfg.data.unlabelled:
        report = SplitReport("unlabelled")
        reports.append(report)
        pairs = _listed(report, lambda: [Pair(p, None, p.stem) for p in unlabelled_images(cfg.data)])
        if pairs is not None:  # its loader must not draw from the global RNG: listing unlabelled images
            with torch.random.fork_rng(devices=[]):  # changes no run (loss.ssl.weight 0 is bit-identical)
                _check_pairs(report, pairs, full, workers, show_progress)
    return DataReport(reports, warnings, notes)


def _report_orphans(report: SplitReport, data: DataConfig, spec: str) -> None:
    problem = orphan_masks(data, spec)
    if problem:
        report.problems.append(problem)


def group_problems(problems: list[str], examples: int = 3) -> list[str]:
    """Problems that differ only by their file, as one line each: ``N files: WHAT (e.g. A, B, C)``, with a
    hint where one helps (class ids outside data.classes: perhaps the void label)."""
    import re

    groups: dict[str, list[str]] = {}
    for problem in problems:
        path, _, what = problem.partition(": ")
        key = what if what and ("/" in path or "." in path) else problem
        groups.setdefault(key, []).append(path if key == what else "")
    lines = []
    for what, paths in groups.items():
        if len(paths) == 1 or not paths[0]:
            lines += [f"{p}: {what}" if p else what for p in paths]
            continue
        shown = ", ".join(paths[:examples]) + (", ..." if len(paths) > examples else "")
        line = f"{len(paths)} files: {what} (e.g. {shown})"
        ids = re.search(r"class id\(s\) \[(\d+)\] outside", what)
        if ids:
            line += f"; if {ids.group(1)} is the void/unlabelled id, set data.ignore_index: {ids.group(1)}"
        lines.append(line)
    return lines


def require_clean(report: DataReport) -> None:
    """Raise one error listing every problem (grouped; the first ones in full)."""
    problems = report.problems
    if problems:
        grouped = group_problems(problems)
        shown = "\n  ".join(grouped[:20])
        more = f"\n  ... and {len(grouped) - 20} more" if len(grouped) > 20 else ""
        raise SamftError(f"data check found {len(problems)} problem(s); fix them or set data.check=off:\n  "
                         f"{shown}{more}")
