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

from samft.config import Config
from samft.data.classes import ClassSpec
from samft.data.datasets import load_pair
from samft.data.io import read_image, read_mask_values
from samft.data.layouts import Layout, Pair, split_pairs, named_test_splits, train_val_pairs
from samft.progress import progress
from samft.data.unlabelled import unlabelled_images
from samft.errors import SamftError


@dataclass
class SplitReport:
    name: str
    pairs: int = 0
    image_sizes: Counter = field(default_factory=Counter)  # (w, h) -> count
    mask_values: Counter = field(default_factory=Counter)  # raw mask value -> pixel count (full check)
    foreground: list = field(default_factory=list)  # foreground fraction per mask (full check)
    problems: list = field(default_factory=list)

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

    @property
    def problems(self) -> list[str]:
        return [p for s in self.splits for p in s.problems]

    def as_dict(self) -> dict:
        return {"splits": {s.name: s.as_dict() for s in self.splits}, "warnings": self.warnings,
                "ok": not self.problems}


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
                fg = mask != 0 if self.classes is None else (mask != 0) & (mask != self.classes.ignore_index)
                return {"size": (image.shape[1], image.shape[0]), "values": dict(zip(values.tolist(), counts.tolist())),
                        "fg": float(fg.mean())}
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
    loader = DataLoader(_CheckDataset(pairs, full, classes), batch_size=None, num_workers=workers)
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
    if split is not None:
        train, val = split
        everything = train + val if not layout.val else train
        train_names = {p.image.resolve() for p in everything}
        _check_pairs(train_report, everything, full, workers, show_progress, classes)
        if layout.val:
            val_report = SplitReport("val")
            reports.append(val_report)
            _check_pairs(val_report, val, full, workers, show_progress, classes)
    warnings = []
    for name, spec in named_test_splits(cfg.data).items():
        report = SplitReport(f"test:{name}")
        reports.append(report)
        pairs = _listed(report, lambda spec=spec: split_pairs(cfg.data, spec))
        if pairs is None:
            continue
        _check_pairs(report, pairs, full, workers, show_progress, classes)
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
    return DataReport(reports, warnings)


def require_clean(report: DataReport) -> None:
    """Raise one error listing every problem (the first ones in full)."""
    problems = report.problems
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SamftError(f"data check found {len(problems)} problem(s); fix them or set data.check=off:\n  "
                         f"{shown}{more}")
