"""SLIP's SimCLR augmentation adapted to SAM, and the unlabelled stream's dataset of two views per image.

Each item is two views of one image: random resized crop (scale 0.08-1) to the model's square input, colour
jitter 0.4/0.4/0.4/0.1 with p 0.8, greyscale p 0.2, Gaussian blur sigma in [0.1, 2] with p 0.5, horizontal
flip, then SAM's normalisation (:class:`samft.data.transforms.SamTransform`; the crop is square, so there is
no padding). The views of item ``i`` in epoch ``e`` depend only on (seed, e, i), whatever the worker or the
resume point. Where the images are: :mod:`samft.data.unlabelled`.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
from torch.utils.data import Dataset

from samft.data.io import read_image
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
