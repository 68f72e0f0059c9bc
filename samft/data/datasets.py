"""Dataset layouts, splits and the torch datasets.

A *split* is either a folder holding ``image_dir/`` and ``mask_dir/`` (images and masks matched by
file stem, the mask stem optionally carrying ``mask_suffix``) or a CSV list of (image, mask) paths
(``image,label`` columns with or without a header, an optional unnamed index column; paths relative to
the CSV's folder).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from samft.config import DataConfig
from samft.data.io import IMAGE_EXTS, is_image_name, read_binary_mask, read_image
from samft.data.transforms import SamTransform
from samft.errors import DataError


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Optional[Path]  # None for prediction inputs
    name: str  # output name (the image's stem, made unique within a split)


def _listed(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p for p in files if not is_image_name(p)]
    if others:
        raise DataError(
            f"{others[0]}: not an image file in the {what} folder (expected one of {', '.join(IMAGE_EXTS)}); "
            f"{len(others)} such file(s) in {folder}"
        )
    return files


def folder_pairs(split_dir: Path, image_dir: str = "images", mask_dir: str = "masks",
                 mask_suffix: str = "") -> list[Pair]:
    """Pairs of ``split_dir/image_dir/X.*`` and ``split_dir/mask_dir/X{mask_suffix}.*``."""
    images = _listed(split_dir / image_dir, "image")
    masks: dict[str, list[Path]] = {}
    for m in _listed(split_dir / mask_dir, "mask"):
        masks.setdefault(m.stem, []).append(m)
    pairs, missing = [], []
    for img in images:
        candidates = masks.get(img.stem + mask_suffix, [])
        if not candidates:
            missing.append(img)
            continue
        # prefer a lossless mask when several files share the stem
        candidates.sort(key=lambda p: (p.suffix.lower() not in (".png", ".bmp", ".tif", ".tiff"), p.name))
        pairs.append(Pair(img, candidates[0], img.stem))
    if missing:
        want = split_dir / mask_dir / f"{missing[0].stem}{mask_suffix}.png"
        raise DataError(f"{missing[0]}: no mask found (looked for {want} with any image extension); "
                        f"{len(missing)} of {len(images)} images have no mask")
    return pairs


def _looks_like_header(row: list[str]) -> bool:
    names = {c.strip().lower() for c in row}
    return bool(names & {"image", "label", "mask", "image_path", "mask_path", "label_path", "img", "gt"})


def _csv_path(base: Path, value: str) -> Path:
    value = value.strip()
    p = Path(value)
    if p.is_absolute() and p.exists():
        return p
    candidate = base / value.lstrip("/\\")  # tolerate a stray leading slash on a relative path
    if candidate.exists() or not p.is_absolute():
        return candidate
    return p


def _csv_base(csv_file: Path, first: list[str], roots: tuple[Path, ...]) -> Path:
    """The folder the CSV's relative paths start from: its own folder, ``roots`` (data.root) or an
    ancestor, whichever holds the first row's files (finetune-SAM lists paths from the dataset root)."""
    candidates = [csv_file.parent, *roots, *list(csv_file.parent.parents)[:3]]
    for base in candidates:
        if all(_csv_path(base, value).exists() for value in first):
            return base
    return csv_file.parent


def csv_pairs(csv_file: Path, roots: tuple[Path, ...] = ()) -> list[Pair]:
    """Pairs from a CSV: ``image,label`` (or ``mask``) columns, or a headerless two-column list.

    Relative paths are resolved against the CSV's folder, else ``roots`` or the CSV's ancestors.
    """
    if not csv_file.is_file():
        raise DataError(f"{csv_file}: CSV file not found")
    with open(csv_file, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{csv_file}: the CSV is empty")
    base = csv_file.parent
    if _looks_like_header(rows[0]):
        header = [c.strip().lower() for c in rows[0]]
        img_col = next((header.index(c) for c in ("image", "image_path", "img") if c in header), None)
        mask_col = next((header.index(c) for c in ("label", "mask", "label_path", "mask_path", "gt") if c in header),
                        None)
        if img_col is None or mask_col is None:
            raise DataError(f"{csv_file}: header {rows[0]} needs an 'image' column and a 'label' (or 'mask') column")
        body, first_line = rows[1:], 2
    else:
        width = len(rows[0])
        if width < 2:
            raise DataError(f"{csv_file}: line 1 has {width} column; expected image and mask paths")
        # a leading integer column is an index (pandas to_csv without a header)
        img_col = 1 if width >= 3 and rows[0][0].strip().isdigit() else 0
        mask_col = img_col + 1
        body, first_line = rows, 1
    if not body:
        raise DataError(f"{csv_file}: the CSV lists no image/mask pairs")
    if len(body[0]) > max(img_col, mask_col):
        base = _csv_base(csv_file, [body[0][img_col], body[0][mask_col]], roots)
    pairs = []
    for i, row in enumerate(body):
        line = first_line + i
        if len(row) <= max(img_col, mask_col):
            raise DataError(f"{csv_file}: line {line} has {len(row)} columns, expected at least {max(img_col, mask_col) + 1}")
        img = _csv_path(base, row[img_col])
        mask = _csv_path(base, row[mask_col])
        pairs.append(Pair(img, mask, img.stem))
    return unique_names(pairs)


def unique_names(pairs: list[Pair]) -> list[Pair]:
    """Make output names unique by prefixing parent folders where stems repeat."""
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p.name] = counts.get(p.name, 0) + 1
    if all(c == 1 for c in counts.values()):
        return pairs
    out = []
    for p in pairs:
        if counts[p.name] > 1:
            parts = [*p.image.parent.parts[-2:], p.image.stem]
            out.append(Pair(p.image, p.mask, "_".join(parts)))
        else:
            out.append(p)
    return out


def resolve_path(data: DataConfig, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data.root).expanduser() / p


def split_pairs(data: DataConfig, spec: str) -> list[Pair]:
    """The pairs of one split given as a folder or CSV path (relative to ``data.root``)."""
    path = resolve_path(data, spec)
    use_csv = data.format == "csv" or (data.format == "auto" and path.suffix.lower() == ".csv")
    if not path.exists():
        raise DataError(f"{path}: split not found (data.root is {data.root!r})")
    pairs = (csv_pairs(path, (Path(data.root).expanduser(),)) if use_csv
             else folder_pairs(path, data.image_dir, data.mask_dir, data.mask_suffix))
    if not pairs:
        raise DataError(f"{path}: the split is empty (no image/mask pairs)")
    return pairs


def train_val_pairs(data: DataConfig) -> tuple[list[Pair], list[Pair]]:
    """Training and validation pairs; without ``data.val`` a seeded ``val_fraction`` is held out."""
    train = split_pairs(data, data.train)
    if data.val:
        return train, split_pairs(data, data.val)
    order = list(range(len(train)))
    random.Random(data.split_seed).shuffle(order)
    n_val = max(1, round(len(train) * data.val_fraction))
    if n_val >= len(train):
        raise DataError(f"{resolve_path(data, data.train)}: {len(train)} pairs are too few to hold out "
                        f"data.val_fraction={data.val_fraction} for validation; set data.val")
    val_idx = set(order[:n_val])
    return ([p for i, p in enumerate(train) if i not in val_idx], [p for i, p in enumerate(train) if i in val_idx])


def eval_sets(data: DataConfig, extra: Optional[dict[str, str]] = None) -> dict[str, list[Pair]]:
    """Named test sets: ``extra`` (e.g. ``eval --data``) or ``data.test``, else the validation split."""
    named = extra or data.test
    if named:
        return {name: split_pairs(data, spec) for name, spec in named.items()}
    return {"val": train_val_pairs(data)[1]}


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its binary mask (uint8 0/1), checking that their sizes agree."""
    image = read_image(pair.image)
    mask = read_binary_mask(pair.mask)
    if image.shape[:2] != mask.shape:
        raise DataError(f"{pair.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{pair.image} ({image.shape[1]}x{image.shape[0]})")
    return image, mask.astype(np.uint8)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: the same whatever the worker or resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainDataset(Dataset):
    """Training samples: image (3, S, S), mask (S, S) uint8, valid_hw (2,)."""

    def __init__(self, pairs: list[Pair], img_size: int, hflip: float, seed: int) -> None:
        self.pairs, self.seed, self.epoch = pairs, seed, 0
        self.transform = SamTransform(img_size, hflip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image, mask = load_pair(self.pairs[i])
        out = self.transform(image, mask, seed=sample_seed(self.seed, self.epoch, i))
        out["index"] = i
        return out


class EvalDataset(Dataset):
    """Evaluation/prediction samples: the preprocessed image plus what is needed to go back to the
    original resolution (orig_hw) and, when there is a mask, the ground truth at that resolution."""

    def __init__(self, pairs: list[Pair], img_size: int) -> None:
        self.pairs = pairs
        self.transform = SamTransform(img_size, 0.0)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        if pair.mask is not None:
            image, gt = load_pair(pair)
        else:
            image, gt = read_image(pair.image), None
        out = self.transform(image)
        out.update(index=i, orig_hw=torch.tensor(image.shape[:2]), gt=gt)
        return out


def collate(batch: list[dict]) -> dict:
    """Stack tensors of equal shape; keep everything else (ground truths of varying size) as lists."""
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
