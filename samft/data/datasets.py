"""Reading image/mask pairs and the torch datasets (the layouts are in ``samft.data.layouts``)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from typing import Optional

from samft.data.classes import ClassSpec, mask_to_ids
from samft.data.io import checked_binary, read_image, read_image_oriented, read_mask_for_image
from samft.data.layouts import Pair
from samft.data.transforms import SamTransform
from samft.errors import DataError


def load_pair(pair: Pair, classes: Optional[ClassSpec] = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its mask, aligned (EXIF) and checked.

    Binary (``classes`` None): the mask as uint8 0/1. Multi-class: class ids (uint8, ``ignore_index``
    kept). A mask whose size differs from its image, or whose values do not fit the task, is an error
    naming the file: a bad mask never silently becomes an empty one.
    """
    image, transpose, raw_hw = read_image_oriented(pair.image)
    if classes is None:
        values = read_mask_for_image(pair.mask, transpose, raw_hw)
    else:
        values = read_mask_for_image(pair.mask, transpose, raw_hw, lambda im: mask_to_ids(im, classes, pair.mask))
    if image.shape[:2] != values.shape:
        raise DataError(f"{pair.mask}: mask size {values.shape[1]}x{values.shape[0]} differs from its image "
                        f"{pair.image} ({image.shape[1]}x{image.shape[0]})")
    if classes is not None:
        return image, values.astype(np.uint8 if values.max(initial=0) < 256 else np.int32)
    return image, checked_binary(values, pair.mask).astype(np.uint8)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of one sample in one epoch: the same whatever the worker or resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TrainDataset(Dataset):
    """Training samples: image (3, S, S), mask (S, S) (0/1, or class ids with padding = ignore), valid_hw (2,)."""

    def __init__(self, pairs: list[Pair], img_size: int, hflip: float, seed: int,
                 classes: Optional[ClassSpec] = None, resize: str = "pad") -> None:
        self.pairs, self.seed, self.epoch, self.classes = pairs, seed, 0, classes
        self.transform = SamTransform(img_size, hflip, mask_fill=classes.ignore_index if classes else 0,
                                      resize=resize)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image, mask = load_pair(self.pairs[i], self.classes)
        out = self.transform(image, mask, seed=sample_seed(self.seed, self.epoch, i))
        out["index"] = i
        return out


class EvalDataset(Dataset):
    """Evaluation/prediction samples: the preprocessed image plus what is needed to go back to the
    original resolution (orig_hw) and, when there is a mask, the ground truth at that resolution."""

    def __init__(self, pairs: list[Pair], img_size: int, classes: Optional[ClassSpec] = None,
                 resize: str = "pad") -> None:
        self.pairs, self.classes = pairs, classes
        self.transform = SamTransform(img_size, 0.0, resize=resize)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        if pair.mask is not None:
            image, gt = load_pair(pair, self.classes)
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
