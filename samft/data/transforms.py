"""SAM-style preprocessing with albumentations.

``resize="pad"`` (samft, SAM's own): resize the longest side to ``img_size`` (aspect ratio kept), optionally
flip, normalise with SAM's pixel mean/std, then pad bottom/right with zeros to ``img_size`` x ``img_size``
(zero = the mean colour after normalisation, as SAM pads). The valid (unpadded) size is returned so
predictions can be cropped.

``resize="squash"`` (AutoGluon, ``data/process_image.py`` ``resize_to_square``/``resize_gt_to_square``):
optionally flip, then resize to ``img_size`` x ``img_size`` whatever the aspect ratio, the image bicubic as
PIL does it (torchvision's ``Resize`` on a PIL image), the mask nearest as PIL does it; no padding, so the
valid size is the whole input and a prediction goes back to the original size by resizing it.
"""

from __future__ import annotations

from typing import Optional

import albumentations as A
import cv2
import numpy as np
import torch

from samft.constants import PIXEL_MEAN, PIXEL_STD

RESIZES = ("pad", "squash")


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` samples over ``n_in``: ``floor((i + 0.5) n_in / n_out)``, PIL's
    nearest (and OpenCV's INTER_NEAREST_EXACT; plain INTER_NEAREST uses ``floor(i n_in / n_out)``)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def squash_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) mask of any dtype (class ids, 0/1, ignore values kept) -> (size, size), nearest as PIL."""
    return mask[nearest_indices(mask.shape[0], size)][:, nearest_indices(mask.shape[1], size)]


def squash_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, PIL's bicubic (antialiased when shrinking), as AutoGluon."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


class SamTransform:
    """(H, W, 3) uint8 image [+ (H, W) uint8 mask] -> normalised padded tensors and the valid size."""

    def __init__(self, img_size: int, hflip: float = 0.0, mask_fill: int = 0, resize: str = "pad") -> None:
        if resize not in RESIZES:
            raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZES)}")
        self.img_size, self.resize = img_size, resize
        geometric = [A.LongestMaxSize(max_size=img_size)] if resize == "pad" else []
        if hflip > 0:
            geometric.append(A.HorizontalFlip(p=hflip))
        self.geometric = A.Compose(geometric)
        self.finish = A.Compose([
            A.Normalize(mean=[m / 255 for m in PIXEL_MEAN], std=[s / 255 for s in PIXEL_STD], max_pixel_value=255.0),
            A.PadIfNeeded(min_height=img_size, min_width=img_size, position="top_left",
                          border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=mask_fill),
        ])

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray] = None, seed: Optional[int] = None) -> dict:
        if seed is not None:
            self.geometric.set_random_seed(seed)
        args = {"image": image} if mask is None else {"image": image, "mask": mask}
        out = self.geometric(**args)
        if self.resize == "squash":
            out["image"] = squash_image(out["image"], self.img_size)
            if mask is not None:
                out["mask"] = squash_mask(out["mask"], self.img_size)
        valid = out["image"].shape[:2]
        out = self.finish(**out)
        result = {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))).float(),
            "valid_hw": torch.tensor(valid, dtype=torch.long),
        }
        if mask is not None:
            result["mask"] = torch.from_numpy(np.ascontiguousarray(out["mask"]))
        return result


def valid_mask(valid_hw: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2) valid sizes -> (B, 1, size, size) float mask, 1 inside the unpadded region."""
    rows = torch.arange(size, device=valid_hw.device)
    inside_h = rows[None, :] < valid_hw[:, :1]
    inside_w = rows[None, :] < valid_hw[:, 1:]
    return (inside_h[:, :, None] & inside_w[:, None, :]).unsqueeze(1).float()
