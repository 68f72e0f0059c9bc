"""The multi-class set loss with a ``valid`` mask, through ``MultiClassTask.loss`` as training calls it.

Invariants (read off ``samft.tasks.losses.set_loss``):

- all-pixel path (``loss.set.points`` 0, samft): a pixel outside ``valid`` counts nowhere, so the loss of
  a padded batch does not change when the padding's logits and labels change, and the loss of one padded
  image *is* the loss of its unpadded crop (the class cross-entropy covers every query either way; the
  mask terms are means over the kept pixels);
- point-sampled path (autogluon): the points are drawn over the whole padded square, so the crop is not the
  same loss; a label under the padding never counts (targets are interpolated over kept pixels only); a
  sampled point weighs by the bilinear share of kept pixels, so with uniform points only (``importance``
  0) logits further than one pixel from the valid region do not count either; with importance sampling
  neither, since a candidate with no kept pixel around it is never ranked among the uncertain ones. The points come from the global RNG (``MultiClassTask.loss`` passes no generator): each
  call is seeded the same.
"""

from __future__ import annotations

import pytest
import torch

from samft.config import config_from_dict
from samft.data.transforms import valid_mask
from samft.tasks.task import MultiClassTask, make_task

CLASSES = ["bg", "a", "b", "c"]
S = 16


def _task(protocol: str = "samft", **loss_set) -> MultiClassTask:
    cfg = config_from_dict({"protocol": protocol, "data": {"classes": CLASSES}, "model": {"num_mask_tokens": 5},
                            "loss": {"set": loss_set}})
    task = make_task(cfg)
    assert isinstance(task, MultiClassTask)
    return task


def _batch(seed: int, valid_hw: list[tuple[int, int]]):
    """Random logits (B, Q, S, S), class logits (B, Q, C+1), labels (B, S, S) with an ignored strip, and the
    (B, 1, S, S) float valid mask of ``valid_hw`` (bottom/right padding, as the loader pads)."""
    g = torch.Generator().manual_seed(seed)
    b, q = len(valid_hw), 5
    logits = torch.randn(b, q, S, S, generator=g) * 3
    class_logits = torch.randn(b, q, len(CLASSES) + 1, generator=g)
    target = torch.randint(0, len(CLASSES), (b, S, S), generator=g)
    target[:, 1, :3] = 255  # ignored pixels inside the valid region
    valid = valid_mask(torch.tensor(valid_hw), S)
    return logits, class_logits, target, valid


def _scramble_padding(logits, target, valid, seed, margin: int = 0):
    """Arbitrary logits and labels (classes, ignore, a class absent inside) wherever ``valid`` is 0, keeping
    those within ``margin`` pixels of the valid region."""
    g = torch.Generator().manual_seed(seed)
    pad = valid[:, 0] == 0
    if margin:
        near = torch.nn.functional.max_pool2d(valid, 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
        pad = pad & ~near
    assert pad.any()
    new_logits = torch.where(pad[:, None], torch.randn(logits.shape, generator=g) * 40, logits)
    junk = torch.randint(0, len(CLASSES), target.shape, generator=g)
    junk[:, ::3] = 255
    new_target = torch.where(pad, junk, target)
    assert not torch.equal(new_target, target) and not torch.equal(new_logits, logits)
    return new_logits, new_target


def _loss(task, logits, class_logits, target, valid, seed=0):
    torch.manual_seed(seed)  # the sampled path draws its points from the global RNG
    return float(task.loss(logits, class_logits, target, valid))


@pytest.mark.parametrize("valid_hw", [[(16, 11), (9, 16)], [(12, 12), (16, 16)]])
def test_all_pixel_loss_ignores_the_padding(valid_hw):
    task = _task("samft")
    assert task.sampling is None
    logits, class_logits, target, valid = _batch(0, valid_hw)
    new_logits, new_target = _scramble_padding(logits, target, valid, seed=1)
    a = _loss(task, logits, class_logits, target, valid)
    b = _loss(task, new_logits, class_logits, new_target, valid)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    # without the mask the padding would count: the scrambled padding changes the loss (the test can fail)
    ones = torch.ones_like(valid)
    assert abs(_loss(task, logits, class_logits, target, ones) - _loss(task, new_logits, class_logits, new_target,
                                                                       ones)) > 1e-2


@pytest.mark.parametrize("h, w", [(16, 10), (7, 16), (11, 13)])
def test_all_pixel_loss_of_a_padded_image_is_the_loss_of_its_crop(h, w):
    task = _task("samft")
    logits, class_logits, target, valid = _batch(2, [(h, w)])
    padded = _loss(task, logits, class_logits, target, valid)
    crop = _loss(task, logits[..., :h, :w].contiguous(), class_logits, target[:, :h, :w].contiguous(), None)
    assert padded == pytest.approx(crop, rel=1e-5, abs=1e-6)


def test_point_sampled_loss_ignores_labels_under_the_padding():
    task = _task("autogluon", points=40)
    assert task.sampling is not None and task.sampling.importance > 0
    logits, class_logits, target, valid = _batch(3, [(16, 9), (10, 16)])
    _, new_target = _scramble_padding(logits, target, valid, seed=4)
    for seed in range(3):
        a = _loss(task, logits, class_logits, target, valid, seed)
        b = _loss(task, logits, class_logits, new_target, valid, seed)
        assert a == b, seed


@pytest.mark.parametrize("importance", [0.0, 0.75])
def test_point_sampled_loss_ignores_logits_away_from_the_valid_region(importance):
    """Uniform points (importance 0) fall where they fall; importance-sampled candidates with no kept pixel
    around them are never chosen, so the padding's logits do not choose the points either."""
    task = _task("autogluon", points=40, importance=importance)
    logits, class_logits, target, valid = _batch(5, [(16, 9), (10, 16)])
    new_logits, new_target = _scramble_padding(logits, target, valid, seed=6, margin=1)
    for seed in range(3):
        a = _loss(task, logits, class_logits, target, valid, seed)
        b = _loss(task, new_logits, class_logits, new_target, valid, seed)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), seed
    ones = torch.ones_like(valid)  # the same change counts when nothing is padding (the test can fail)
    assert abs(_loss(task, logits, class_logits, target, ones) - _loss(task, new_logits, class_logits, new_target,
                                                                       ones)) > 1e-2
