"""Unlabelled images for self-supervision (``data.unlabelled``): where they are.

Sources, each resolved against ``data.root`` like a split:

- a folder: its images (or those of its ``data.image_dir`` sub-folder when it is a labelled split folder);
- a glob (``frames/**/*.jpg``): every image file it matches;
- a CSV list (``.csv``): the ``image`` column (or ``image_path``, ``img``), else the first column (the
  second when the first is an integer index); relative paths start where those of a split CSV do;
- ``train``: the training split's images (after the validation hold-out).

SLIP's two-view augmentation of these images and their dataset are :mod:`samft.slip.augment`'s.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from samft.config import DataConfig
from samft.data.paths import expand_glob, has_magic
from samft.data.io import IMAGE_EXTS, is_image_name
from samft.data.layouts import (IMAGE_COLUMNS, Layout, _csv_base, _csv_path, _looks_like_header, csv_rows, header_column,
                                list_images, train_val_pairs)
from samft.errors import DataError

def unlabelled_images(data: DataConfig) -> list[Path]:
    """The images of every source in ``data.unlabelled``, in order, each file once (a warning when repeated)."""
    layout = Layout.of(data)
    images, seen, repeated = [], set(), 0
    for spec in data.unlabelled:
        for path in _source_images(data, layout, spec):
            key = path.resolve()
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            images.append(path)
    if repeated:
        warnings.warn(f"data.unlabelled: {repeated} image(s) listed by more than one source are used once",
                      stacklevel=2)
    return images


def _source_images(data: DataConfig, layout: Layout, spec: str) -> list[Path]:
    if spec == "train":
        return [p.image for p in train_val_pairs(data)[0]]
    if has_magic(spec):
        pattern = str(layout.path(spec))
        files, loops = expand_glob(pattern)
        if loops:
            warnings.warn(f"data.unlabelled: {pattern}: {len(loops)} link(s) to a folder that leads back to itself "
                          f"not followed (e.g. {loops[0]})", stacklevel=2)
        files = [p for p in files if is_image_name(p) and not layout.ignored(p)]
        if not files:
            raise DataError(f"{pattern}: the glob in data.unlabelled matches no image file "
                            f"({', '.join(IMAGE_EXTS)})")
        return files
    path = layout.path(spec)
    if path.is_file() and path.suffix.lower() == ".csv":
        return csv_images(path, (layout.root,))
    if path.is_dir():
        folder = path / layout.image_dir if (path / layout.image_dir).is_dir() else path
        files = list_images(folder, "unlabelled image", layout)
        if not files:
            raise DataError(f"{folder}: no image files in this data.unlabelled folder (for sub-folders use a glob "
                            f"such as '{spec}/**/*.jpg')")
        return files
    raise DataError(f"{path}: data.unlabelled source not found (expected a folder, a glob, a .csv list of images "
                    f"or 'train')")


def csv_images(csv_file: Path, roots: tuple[Path, ...] = ()) -> list[Path]:
    """Image paths of a CSV list (see the module docstring); a listed file that does not exist is an error."""
    rows = csv_rows(csv_file)
    if rows and _looks_like_header(rows[0]):
        col = header_column(rows[0], IMAGE_COLUMNS)
        if col is None:
            raise DataError(f"{csv_file}: header {rows[0]} has no 'image' column")
        rows = rows[1:]
    elif rows:
        col = 1 if len(rows[0]) >= 2 and rows[0][0].strip().isdigit() else 0
    if not rows:
        raise DataError(f"{csv_file}: the CSV lists no images")
    short = next((i for i, r in enumerate(rows) if len(r) <= col), None)
    if short is not None:
        raise DataError(f"{csv_file}: row {short + 1} of the list has no column {col + 1} (the image path)")
    base = _csv_base(csv_file, [rows[0][col]], roots)
    images = [_csv_path(base, r[col]) for r in rows]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: listed in {csv_file} but not found ({len(missing)} of {len(images)} "
                        f"listed images are missing)")
    return images
