"""SamTransform's deterministic path (OpenCV + NumPy, no albumentations) equals the albumentations pipeline it
replaced bit for bit; the random-flip path still goes through albumentations."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from samft.constants import PIXEL_MEAN, PIXEL_STD
from samft.data.transforms import SamTransform


def albumentations_reference(image, mask, img_size, hflip, mask_fill, resize, seed=None):
    """The pipeline as it was: LongestMaxSize (pad) [+ flip], squash, Normalize, PadIfNeeded top-left."""
    import albumentations as A

    from samft.data.transforms import squash_image, squash_mask

    geometric = A.Compose(([A.LongestMaxSize(max_size=img_size)] if resize == "pad" else [])
                          + ([A.HorizontalFlip(p=hflip)] if hflip > 0 else []))
    finish = A.Compose([
        A.Normalize(mean=[m / 255 for m in PIXEL_MEAN], std=[s / 255 for s in PIXEL_STD], max_pixel_value=255.0),
        A.PadIfNeeded(min_height=img_size, min_width=img_size, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=mask_fill)])
    if seed is not None:
        geometric.set_random_seed(seed)
    out = geometric(**({"image": image} if mask is None else {"image": image, "mask": mask}))
    if resize == "squash":
        out["image"] = squash_image(out["image"], img_size)
        if mask is not None:
            out["mask"] = squash_mask(out["mask"], img_size)
    valid = out["image"].shape[:2]
    out = finish(**out)
    return out["image"].transpose(2, 0, 1), valid, out.get("mask")


@pytest.mark.parametrize("resize", ["pad", "squash"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_the_deterministic_path_equals_albumentations_bit_for_bit(resize, with_mask):
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(3, 400, 2))
        size = int(rng.choice([16, 64, 192, 257]))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 4, (h, w), dtype=np.uint8) if with_mask else None
        got = SamTransform(size, mask_fill=255, resize=resize)(image, mask)
        ref_image, ref_valid, ref_mask = albumentations_reference(image, mask, size, 0.0, 255, resize)
        assert tuple(got["valid_hw"].tolist()) == tuple(ref_valid), (h, w, size)
        assert got["image"].dtype == torch.float32 and np.array_equal(got["image"].numpy(), ref_image), (h, w, size)
        if with_mask:
            assert np.array_equal(got["mask"].numpy(), ref_mask), (h, w, size)


@pytest.mark.parametrize("resize", ["pad", "squash"])
def test_the_flip_path_is_albumentations_and_seeded(resize):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    mask = rng.integers(0, 2, (50, 80), dtype=np.uint8)
    for seed in range(6):
        got = SamTransform(64, hflip=0.5, resize=resize)(image, mask, seed=seed)
        ref_image, ref_valid, ref_mask = albumentations_reference(image, mask, 64, 0.5, 0, resize, seed=seed)
        assert np.array_equal(got["image"].numpy(), ref_image) and np.array_equal(got["mask"].numpy(), ref_mask)


def test_prediction_imports_no_albumentations():
    code = ("import sys, numpy as np\n"
            "from samft.engine.infer import predict, evaluate\n"
            "from samft.data.datasets import EvalDataset\n"
            "from samft.data.transforms import SamTransform\n"
            "SamTransform(32)(np.zeros((10, 20, 3), np.uint8))\n"
            "print('albumentations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
