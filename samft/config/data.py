"""The ``data`` section: dataset layout, splits, classes and loading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from samft.config.field import opt
from samft.errors import ConfigError

DATA_FORMATS = ("auto", "folders", "csv", "pranet", "sinet", "isic", "sbu", "voc")


@dataclass
class DataConfig:
    format: str = opt("auto", "layout preset: auto (CSV when a split ends in .csv, else folders), folders, csv, "
                      "pranet, sinet, isic, sbu, voc (see samft/data/layouts.py)", DATA_FORMATS)
    root: str = opt(".", "dataset folder; relative split paths are resolved against it")
    train: Optional[str] = opt(None, "training split: folder, IMAGES::MASKS folders, CSV or VOC list "
                                     "(null = the format's default, e.g. TrainDataset)")
    val: Optional[str] = opt(None, "validation split; null = the format's (VOC: val) or hold out val_fraction")
    val_fraction: float = opt(0.1, "fraction of train held out for validation when there is no val split",
                              minimum=0.0)
    test: dict[str, str] = opt({}, "named test sets {name: split}; empty = the format's test sets "
                                   "(e.g. every TestDataset/ folder), else the validation split")
    image_dir: Optional[str] = opt(None, "sub-folder of a split holding the images (null = the format's)")
    mask_dir: Optional[str] = opt(None, "sub-folder of a split holding the masks (null = the format's)")
    mask_suffix: Optional[str] = opt(None, "added to an image's stem to name its mask (null = the format's, "
                                           "e.g. _segmentation for isic)")
    ignore: list[str] = opt([], "glob patterns of files to skip in image/mask folders (e.g. '*_superpixels.png')")
    check: str = opt("full", "checks before training: full (decode every file), quick (paths and sizes), off",
                     ("full", "quick", "off"), resumable=True)
    classes: list[str] = opt([], "class names, index = class id (background included); empty = binary masks")
    palette: list[list[int]] = opt([], "RGB colour of each class in colour-coded masks and predicted palette PNGs "
                                       "(empty = Pascal VOC's colour map)")
    ignore_index: int = opt(255, "class id excluded from the loss and the metrics (VOC's boundary)")
    background: Optional[int] = opt(0, "multi-class: class id of the background (left untinted in overlays, not "
                                        "'foreground' in data check); null = the data has no background class "
                                        "(e.g. CamVid's sky is class 0)")
    ignore_colors: list[list[int]] = opt([[224, 224, 192]], "colours of colour-coded masks mapped to ignore_index")
    split_seed: int = opt(0, "seed of the train/validation hold-out split")
    split_file: Optional[str] = opt(None, "a run's split.json (its train and validation file lists) to use as the "
                                          "train/val split instead of data.train/val/val_fraction")
    num_workers: int = opt(2, "data-loading worker processes (0 = load in the main process)", minimum=0,
                           resumable=True)
    unlabelled: list[str] = opt([], "images without masks for the SSL loss (loss.ssl): folders, globs, CSV lists of "
                                    "images, or 'train' (the training images); empty = none")
    resize: Optional[str] = opt(None, "input geometry: pad (longest side to img_size, pad bottom/right; samft) or "
                                      "squash (resize to img_size x img_size, bicubic, ground truth nearest; "
                                      "AutoGluon); null = the protocol's", ("pad", "squash"))

    def validate(self, prefix: str) -> None:  # not check(): that is an option of the section
        """The hold-out fraction, the colours, and class ids that must fall inside (or outside) data.classes."""
        if not self.root.strip():
            raise ConfigError(f"{prefix}.root: empty; give the dataset folder ('.' for the current one)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{prefix}.val_fraction: {self.val_fraction} must be in [0, 1)")
        self._check_colours(prefix)
        self._check_class_ids(prefix)

    def _check_colours(self, prefix: str) -> None:
        if self.palette and len(self.palette) != len(self.classes):
            raise ConfigError(f"{prefix}.palette: {len(self.palette)} colours for {len(self.classes)} classes in "
                              f"{prefix}.classes")
        for key, colours in ((f"{prefix}.palette", self.palette), (f"{prefix}.ignore_colors", self.ignore_colors)):
            for c in colours:
                if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                    raise ConfigError(f"{key}: {c} is not an RGB colour (three values 0..255)")

    def _check_class_ids(self, prefix: str) -> None:
        classes = self.classes
        if classes and 0 <= self.ignore_index < len(classes):
            raise ConfigError(f"{prefix}.ignore_index: {self.ignore_index} is a class id of {prefix}.classes "
                              f"({classes[self.ignore_index]!r}); use an id outside 0..{len(classes) - 1}")
        if classes and self.background is not None and not 0 <= self.background < len(classes):
            raise ConfigError(f"{prefix}.background: {self.background} is not a class id of {prefix}.classes "
                              f"(0..{len(classes) - 1}); null = no background class")
        if len(classes) == 1:
            raise ConfigError(f"{prefix}.classes: one class is a binary task; leave {prefix}.classes empty for "
                              f"binary masks")
        seen: dict[str, int] = {}
        for i, name in enumerate(classes):
            j = seen.setdefault(name.strip().casefold(), i)
            if j != i:
                raise ConfigError(f"{prefix}.classes: {name!r} (class {i}) has the same name as class {j} "
                                  f"({classes[j]!r}); every class needs its own name")
