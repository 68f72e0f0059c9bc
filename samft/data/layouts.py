"""Dataset layouts: where the image/mask pairs of each split are.

A split is given as a path relative to ``data.root``:

- a folder holding ``image_dir/`` and ``mask_dir/`` (images and masks matched by file stem; the mask's
  stem may carry ``mask_suffix``, e.g. ISIC's ``_segmentation``);
- ``IMAGE_FOLDER::MASK_FOLDER``: two folders given directly (e.g. ISIC's official
  ``ISIC-2017_Training_Data::ISIC-2017_Training_Part1_GroundTruth``);
- a CSV list of (image, mask) paths: AutoGluon's ``image,label`` columns (an unnamed index column is
  allowed) or a headerless two-column list; relative paths start from the CSV's folder, ``data.root`` or
  an ancestor of the CSV, whichever holds the listed files;
- with ``data.format: voc``, the name of a list in ``ImageSets/Segmentation/`` (``train``, ``val``) or a
  ``.txt`` list of ids, resolved to ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png``.

``data.format`` presets fill the sub-folder names and defaults of the published layouts:

| format | images / masks | train | test sets (when data.test is empty) |
|---|---|---|---|
| folders | images / masks | train | the validation split |
| pranet | images / masks | TrainDataset | every folder of TestDataset/ (CVC-300, Kvasir, ...) |
| sinet | Imgs / GT | TrainDataset | every folder of TestDataset/ (CAMO, COD10K, ...) |
| isic | images / masks, mask suffix ``_segmentation`` | train | the validation split |
| sbu | ShadowImages / ShadowMasks | SBUTrain4KRecoveredSmall | SBU-Test |
| voc | JPEGImages / SegmentationClass | list ``train`` | list ``val`` |
| csv | (CSV lists) | train.csv | the validation split |
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from samft.config import DataConfig
from samft.data.io import IMAGE_EXTS, is_image_name
from samft.data import split_file
from samft.errors import DataError


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Optional[Path]  # None for prediction inputs
    name: str  # output name (the image's stem, made unique within a split)


@dataclass(frozen=True)
class Preset:
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = ""
    train: str = "train"
    val: Optional[str] = None
    test_root: Optional[str] = None  # discover every sub-folder as a test set
    test: dict = field(default_factory=dict)  # default named test sets (used when they exist)
    ignore: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    "folders": Preset(),
    "csv": Preset(train="train.csv"),
    "pranet": Preset(train="TrainDataset", test_root="TestDataset"),
    "sinet": Preset(image_dir="Imgs", mask_dir="GT", train="TrainDataset", test_root="TestDataset"),
    "isic": Preset(mask_suffix="_segmentation",
                   ignore=("*_superpixels.*", "*.csv", "*.txt", "LICENSE*", "ATTRIBUTION*")),
    "sbu": Preset(image_dir="ShadowImages", mask_dir="ShadowMasks", train="SBUTrain4KRecoveredSmall",
                  test={"SBU-Test": "SBU-Test"}),
    "voc": Preset(image_dir="JPEGImages", mask_dir="SegmentationClass", val="val", test={"val": "val"}),
}
LOSSLESS = (".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Layout:
    """A DataConfig with the format's defaults filled in."""

    format: str
    root: Path
    image_dir: str
    mask_dir: str
    mask_suffix: str
    train: str
    val: Optional[str]
    ignore: tuple[str, ...]
    preset: Preset

    @classmethod
    def of(cls, data: DataConfig) -> "Layout":
        preset = PRESETS["folders" if data.format == "auto" else data.format]
        return cls(
            format=data.format,
            root=Path(data.root).expanduser(),
            image_dir=data.image_dir if data.image_dir is not None else preset.image_dir,
            mask_dir=data.mask_dir if data.mask_dir is not None else preset.mask_dir,
            mask_suffix=data.mask_suffix if data.mask_suffix is not None else preset.mask_suffix,
            train=data.train if data.train is not None else preset.train,
            val=data.val if data.val is not None else preset.val,
            ignore=tuple(preset.ignore) + tuple(data.ignore),
            preset=preset,
        )

    def path(self, spec: str) -> Path:
        p = Path(spec).expanduser()
        return p if p.is_absolute() else self.root / p

    def ignored(self, path: Path) -> bool:
        return any(fnmatch.fnmatch(path.name, pattern) for pattern in self.ignore)


def list_images(folder: Path, what: str, layout: Optional[Layout] = None) -> list[Path]:
    """The image files of a folder, sorted; any other (non-hidden, non-ignored) file is an error."""
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and not (layout and layout.ignored(p)))
    others = [p for p in files if not is_image_name(p)]
    if others:
        raise DataError(
            f"{others[0]}: not an image file in the {what} folder (expected one of {', '.join(IMAGE_EXTS)}); "
            f"{len(others)} such file(s) in {folder} (skip them with data.ignore)"
        )
    return files


def _refuse_shared_stems(images: list[Path]) -> None:
    """Two images with one stem (``0001.png`` and ``0001.jpg``) would both be paired with the one mask."""
    seen: dict[str, Path] = {}
    for img in images:
        other = seen.setdefault(img.stem.lower(), img)
        if other is not img:
            raise DataError(f"{img}: has the same name as {other.name} apart from the extension, so both would be "
                            f"paired with one mask; remove one of them or skip it with data.ignore "
                            f"(e.g. '*{img.suffix}')")


def match_masks(images: list[Path], masks: list[Path], mask_suffix: str, mask_folder: Path) -> list[Pair]:
    """Pair each image with the mask whose stem is the image's stem + ``mask_suffix`` (case-insensitive)."""
    by_stem: dict[str, list[Path]] = {}
    for m in masks:
        by_stem.setdefault(m.stem.lower(), []).append(m)
    _refuse_shared_stems(images)
    pairs, missing = [], []
    for img in images:
        candidates = by_stem.get((img.stem + mask_suffix).lower(), [])
        if not candidates:
            missing.append(img)
            continue
        candidates.sort(key=lambda p: (p.suffix.lower() not in LOSSLESS, p.name))  # prefer a lossless mask
        pairs.append(Pair(img, candidates[0], img.stem))
    if missing:
        want = mask_folder / f"{missing[0].stem}{mask_suffix}.png"
        raise DataError(f"{missing[0]}: no mask found (looked for {want} with any image extension); "
                        f"{len(missing)} of {len(images)} images have no mask")
    return pairs


def folder_pairs(image_folder: Path, mask_folder: Path, mask_suffix: str = "",
                 layout: Optional[Layout] = None) -> list[Pair]:
    """Pairs from an image folder and a mask folder (the same folder is allowed with a mask suffix)."""
    images = list_images(image_folder, "image", layout)
    if image_folder.resolve() == mask_folder.resolve():
        if not mask_suffix:
            raise DataError(f"{image_folder}: images and masks in one folder need data.mask_suffix")
        suffix = mask_suffix.lower()
        masks = [p for p in images if p.stem.lower().endswith(suffix)]
        images = [p for p in images if not p.stem.lower().endswith(suffix)]
    else:
        masks = list_images(mask_folder, "mask", layout)
    return match_masks(images, masks, mask_suffix, mask_folder)


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


IMAGE_COLUMNS = ("image", "image_path", "img")
MASK_COLUMNS = ("label", "mask", "label_path", "mask_path", "gt")


def csv_rows(csv_file: Path) -> list[list[str]]:
    """The CSV's rows that are not blank."""
    with open(csv_file, newline="") as f:
        return [r for r in csv.reader(f) if any(c.strip() for c in r)]


def header_column(header: list[str], names: tuple[str, ...]) -> Optional[int]:
    """The index of the first of ``names`` in a header row (case and spaces ignored), or None."""
    cells = [c.strip().lower() for c in header]
    return next((cells.index(c) for c in names if c in cells), None)


def _pair_columns(csv_file: Path, rows: list[list[str]]) -> tuple[int, int, list[list[str]], int]:
    """(image column, mask column, the rows after any header, the line number of the first of them)."""
    if _looks_like_header(rows[0]):
        img_col, mask_col = header_column(rows[0], IMAGE_COLUMNS), header_column(rows[0], MASK_COLUMNS)
        if img_col is None or mask_col is None:
            raise DataError(f"{csv_file}: header {rows[0]} needs an 'image' column and a 'label' (or 'mask') column")
        return img_col, mask_col, rows[1:], 2
    width = len(rows[0])
    if width < 2:
        raise DataError(f"{csv_file}: line 1 has {width} column; expected image and mask paths")
    # a leading integer column is an index (pandas to_csv without a header)
    img_col = 1 if width >= 3 and rows[0][0].strip().isdigit() else 0
    return img_col, img_col + 1, rows, 1


def csv_pairs(csv_file: Path, roots: tuple[Path, ...] = ()) -> list[Pair]:
    """Pairs from a CSV: ``image,label`` (or ``mask``) columns, or a headerless two-column list."""
    if not csv_file.is_file():
        raise DataError(f"{csv_file}: CSV file not found")
    rows = csv_rows(csv_file)
    if not rows:
        raise DataError(f"{csv_file}: the CSV is empty")
    img_col, mask_col, body, first_line = _pair_columns(csv_file, rows)
    if not body:
        raise DataError(f"{csv_file}: the CSV lists no image/mask pairs")
    need = max(img_col, mask_col) + 1
    base = _csv_base(csv_file, [body[0][img_col], body[0][mask_col]], roots) if len(body[0]) >= need else csv_file.parent
    pairs = []
    for i, row in enumerate(body):
        if len(row) < need:
            raise DataError(f"{csv_file}: line {first_line + i} has {len(row)} columns, expected at least {need}")
        img = _csv_path(base, row[img_col])
        pairs.append(Pair(img, _csv_path(base, row[mask_col]), img.stem))
    return unique_names(pairs)


def voc_pairs(layout: Layout, spec: str) -> list[Pair]:
    """A VOC split: a list name in ImageSets/Segmentation/ or a .txt file of ids."""
    if spec.endswith(".txt"):
        list_file = layout.path(spec)
    else:
        list_file = layout.root / "ImageSets" / "Segmentation" / f"{spec}.txt"
    if not list_file.is_file():
        raise DataError(f"{list_file}: VOC split list not found (data.root should be the VOC2012 folder)")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    images, masks = layout.root / layout.image_dir, layout.root / layout.mask_dir
    pairs = []
    for i in ids:
        found = [images / f"{i}{ext}" for ext in (".jpg", ".jpeg", ".png") if (images / f"{i}{ext}").is_file()]
        pairs.append(Pair(found[0] if found else images / f"{i}.jpg", masks / f"{i}{layout.mask_suffix}.png", i))
    return pairs


def _safe_name(name: str) -> str:
    """A single file-name component: no separators, not hidden, not ``.``/``..``."""
    name = "".join("_" if ch in '/\\\0:' else ch for ch in name)
    return "_" + name if not name or name.startswith(".") else name


def _disambiguate(members: list[int], resolved: list[Path], names: list[str]) -> None:
    """Names for paths whose stems collide: the folders that tell them apart, then the extension."""
    parents = [resolved[i].parent for i in members]
    common = Path(os.path.commonpath([str(q) for q in parents]))
    for i, parent in zip(members, parents):
        parts = [_safe_name(part) for part in parent.relative_to(common).parts]
        names[i] = "_".join([*parts, _safe_name(resolved[i].stem)])
    keys = [names[i].casefold() for i in members]
    for i in members:
        if keys.count(names[i].casefold()) > 1 and resolved[i].suffix:
            names[i] = f"{names[i]}_{_safe_name(resolved[i].suffix.lstrip('.'))}"


def distinct_names(paths: list[Path]) -> list[str]:
    """One output name per path: its stem where that is unique (case-insensitively), else the stem with the
    folders that tell the paths apart (``a_x``, ``b_x``) and, for one folder, the extension (``x_png``,
    ``x_jpg``); a counter as the last resort. Names are single components: never absolute, never ``..``."""
    resolved = [Path(os.path.abspath(p)) for p in paths]  # the paths as given (a link keeps its own name)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(resolved):
        groups.setdefault(_safe_name(p.stem).casefold(), []).append(i)
    names = [_safe_name(p.stem) for p in resolved]
    for members in groups.values():
        if len(members) > 1:
            _disambiguate(members, resolved, names)
    seen: set[str] = set()
    for i, name in enumerate(names):
        candidate, n = name, 1
        while candidate.casefold() in seen:
            n += 1
            candidate = f"{name}_{n}"
        seen.add(candidate.casefold())
        names[i] = candidate
    return names


def unique_names(pairs: list[Pair]) -> list[Pair]:
    """The pairs with distinct output names (see :func:`distinct_names`)."""
    names = distinct_names([p.image for p in pairs])
    return [p if p.name == n else Pair(p.image, p.mask, n) for p, n in zip(pairs, names)]


FOLDER_FORMATS = ("folders", "pranet", "sinet", "isic", "sbu")


def _other_layouts(data: DataConfig, path: Path) -> str:
    """When a folder layout finds no pairs: the other folder presets that do find pairs in ``path``, as a hint."""
    found = []
    for name in FOLDER_FORMATS:
        if name == data.format or (name == "folders" and data.format == "auto"):
            continue
        other = Layout.of(dataclasses.replace(data, format=name, image_dir=None, mask_dir=None, mask_suffix=None))
        try:
            n = len(folder_pairs(path / other.image_dir, path / other.mask_dir, other.mask_suffix, other))
        except DataError:
            continue
        found.append(f"data.format={name} finds {n} pairs there")
    return f" ({'; '.join(found)})" if found else ""


def split_pairs(data: DataConfig, spec: str) -> list[Pair]:
    """The pairs of one split (see the module docstring for the accepted forms)."""
    layout = Layout.of(data)
    if "::" in spec:
        image_spec, mask_spec = spec.split("::", 1)
        image_folder, mask_folder = layout.path(image_spec), layout.path(mask_spec)
        pairs = folder_pairs(image_folder, mask_folder, layout.mask_suffix, layout)
        where = image_folder
    elif layout.format == "voc" and not spec.endswith(".csv"):
        pairs, where = voc_pairs(layout, spec), layout.root
    else:
        path = layout.path(spec)
        if not path.exists():
            raise DataError(f"{path}: split not found (data.root is {data.root!r})")
        where = path
        if layout.format == "csv" or (path.is_file() and path.suffix.lower() == ".csv"):
            pairs = csv_pairs(path, (layout.root,))
        else:
            try:
                pairs = folder_pairs(path / layout.image_dir, path / layout.mask_dir, layout.mask_suffix, layout)
            except DataError as e:
                raise DataError(f"{e}{_other_layouts(data, path)}") from None
    if not pairs:
        raise DataError(f"{where}: the split is empty (no image/mask pairs)")
    return pairs


def split_file_pairs(path: str | Path, root: str | Path) -> tuple[list[Pair], list[Pair]]:
    """The train and validation pairs listed by a split file (``data.split_file``, a run's ``split.json``; read
    and checked by :func:`samft.data.split_file.read`); relative paths start at ``root``; every image exists."""
    path = Path(root) / Path(path).expanduser()
    try:
        listed = split_file.read(path)
    except DataError as e:
        raise DataError(f"data.split_file: {e}") from None
    splits = [[Pair(Path(root) / img, Path(root) / mask, Path(img).stem) for img, mask in listed[name]]
              for name in split_file.NEEDED]
    missing = [p.image for s in splits for p in s if not p.image.is_file()]
    if missing:
        raise DataError(f"data.split_file: {path} lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}")
    return splits[0], splits[1]


def train_val_pairs(data: DataConfig) -> tuple[list[Pair], list[Pair]]:
    """Training and validation pairs: ``data.split_file`` when set; else the layout's splits, and without a
    validation split a seeded ``val_fraction`` is held out."""
    if data.split_file:
        return split_file_pairs(data.split_file, data.root)
    layout = Layout.of(data)
    train = split_pairs(data, layout.train)
    if layout.val:
        return train, split_pairs(data, layout.val)
    if not 0.0 < data.val_fraction < 1.0:
        raise DataError(f"data.val_fraction: {data.val_fraction} must be between 0 and 1 when data.val is null")
    order = list(range(len(train)))
    random.Random(data.split_seed).shuffle(order)
    n_val = max(1, round(len(train) * data.val_fraction))
    if n_val >= len(train):
        raise DataError(f"{layout.path(layout.train)}: {len(train)} pairs are too few to hold out "
                        f"data.val_fraction={data.val_fraction} for validation; set data.val")
    val_idx = set(order[:n_val])
    return ([p for i, p in enumerate(train) if i not in val_idx], [p for i, p in enumerate(train) if i in val_idx])


def named_test_splits(data: DataConfig) -> dict[str, str]:
    """Named test sets: ``data.test``, else the format's (discovered) test sets; may be empty."""
    if data.test:
        return dict(data.test)
    layout = Layout.of(data)
    found = {name: spec for name, spec in layout.preset.test.items()
             if layout.format == "voc" or layout.path(spec).exists()}
    if layout.preset.test_root:
        test_root = layout.path(layout.preset.test_root)
        if test_root.is_dir():
            for sub in sorted(p for p in test_root.iterdir() if (p / layout.image_dir).is_dir()):
                found[sub.name] = str(Path(layout.preset.test_root) / sub.name)
    return found


def eval_sets(data: DataConfig, extra: Optional[dict[str, str]] = None) -> dict[str, list[Pair]]:
    """Named evaluation sets: ``extra`` (``eval --data``), the test sets, else the validation split."""
    named = extra or named_test_splits(data)
    if named:
        return {name: split_pairs(data, spec) for name, spec in named.items()}
    return {"val": train_val_pairs(data)[1]}
