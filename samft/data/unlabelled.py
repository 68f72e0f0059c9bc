"""Unlabelled images for self-supervision (``data.unlabelled``) and SLIP's two-view augmentation.

Sources, each resolved against ``data.root`` like a split:

- a folder: its images (or those of its ``data.image_dir`` sub-folder when it is a labelled split folder);
- a glob (``frames/**/*.jpg``): every image file it matches;
- a CSV list (``.csv``): the ``image`` column (or ``image_path``, ``img``), else the first column (the
  second when the first is an integer index); relative paths start where those of a split CSV do;
- ``train``: the training split's images (after the validation hold-out).

Each item is two views of one image made with SLIP's SimCLR augmentation, adapted to SAM: random resized
crop (scale 0.08-1) to the model's square input, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, greyscale
p 0.2, Gaussian blur sigma in [0.1, 2] with p 0.5, horizontal flip, then SAM's normalisation
(:class:`samft.data.transforms.SamTransform`; the crop is square, so there is no padding). The views of
item ``i`` in epoch ``e`` depend only on (seed, e, i), whatever the worker or the resume point.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import albumentations as A
import numpy as np
from torch.utils.data import Dataset

from samft.config import DataConfig
from samft.data.paths import expand_glob, has_magic
from samft.data.io import IMAGE_EXTS, is_image_name, read_image
from samft.data.layouts import (IMAGE_COLUMNS, Layout, _csv_base, _csv_path, _looks_like_header, csv_rows, header_column,
                                list_images, train_val_pairs)
from samft.data.transforms import SamTransform
from samft.errors import DataError

STREAM_SALT = 0x55_4E4C  # keeps the views' seeds apart from the labelled stream's for the same index


def view_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one unlabelled item's two views in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index, STREAM_SALT]).generate_state(1)[0])


class TwoViewTransform:
    """(H, W, 3) uint8 image -> {"view1", "view2"}: two (3, S, S) float tensors, SLIP-augmented, SAM-normalised."""

    def __init__(self, img_size: int) -> None:
        self.augment = A.Compose([
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.08, 1.0)),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            A.ToGray(num_output_channels=3, p=0.2),
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, 2.0), p=0.5),
            A.HorizontalFlip(p=0.5),
        ])
        self.finish = SamTransform(img_size)

    def __call__(self, image: np.ndarray, seed: int) -> dict:
        self.augment.set_random_seed(seed)
        views = [self.finish(self.augment(image=image)["image"])["image"] for _ in range(2)]
        return {"view1": views[0], "view2": views[1]}


class UnlabelledDataset(Dataset):
    """Items {"view1": (3, S, S), "view2": (3, S, S), "index": int}; a corrupt image is a DataError naming it."""

    def __init__(self, images: list[Path], img_size: int, seed: int) -> None:
        if not images:
            raise DataError("data.unlabelled: no unlabelled images")
        self.images, self.seed, self.epoch = list(images), seed, 0
        self.transform = TwoViewTransform(img_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        image = read_image(self.images[i])
        out = self.transform(image, view_seed(self.seed, self.epoch, i))
        out["index"] = i
        return out


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
