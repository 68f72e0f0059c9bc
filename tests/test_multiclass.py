"""Multi-class segmentation: matching, MaskFormer inference, the set loss, class masks, metrics, end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from samft.config import DataConfig, config_from_dict
from samft.data.classes import VOC_CLASSES, ClassSpec, voc_colormap
from samft.data.datasets import load_pair
from samft.data.layouts import Pair
from samft.errors import ConfigError, DataError
from samft.tasks.losses import SetLossWeights, match_queries, pairwise_bce, pairwise_dice, set_loss
from samft.tasks.metrics import ConfusionMetrics
from samft.model import build_model
from samft.model.semantic import semantic_probs

from conftest import shared, tiny_config

W = SetLossWeights()


def _cost(class_logits, mask_logits, classes, masks, q, t):
    prob = class_logits.softmax(-1)[q, classes[t]]
    return float(-W.ce * prob + W.bce * pairwise_bce(mask_logits[q : q + 1], masks[t : t + 1])[0, 0]
                 + W.dice * pairwise_dice(mask_logits[q : q + 1], masks[t : t + 1])[0, 0])


@pytest.mark.parametrize("seed, queries, targets", [(0, 4, 2), (1, 5, 3), (2, 3, 3), (3, 6, 1)])
def test_matching_equals_brute_force(seed, queries, targets):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(queries, 4, generator=g) * 2
    mask_logits = torch.randn(queries, 30, generator=g) * 3
    classes = torch.randperm(3, generator=g)[:targets]
    masks = (torch.rand(targets, 30, generator=g) > 0.5).float()
    rows, cols = match_queries(class_logits, mask_logits, classes, masks, W)
    assert sorted(cols.tolist()) == list(range(targets)) and len(set(rows.tolist())) == targets
    ours = sum(_cost(class_logits, mask_logits, classes, masks, q, t) for q, t in zip(rows.tolist(), cols.tolist()))
    best = min(sum(_cost(class_logits, mask_logits, classes, masks, q, t) for t, q in enumerate(perm))
               for perm in itertools.permutations(range(queries), targets))
    assert ours == pytest.approx(best, abs=1e-5)


def test_semantic_inference_hand_computed():
    """q0: p = (0.5, 0.25 | 0.25), sigmoid 0.8; q1: p = (0.1, 0.6 | 0.3), sigmoid 0.5."""
    class_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    mask_logits = torch.tensor([math.log(0.8 / 0.2), 0.0]).reshape(2, 1, 1)
    scores = semantic_probs(class_logits, mask_logits)
    assert scores.shape == (2, 1, 1)
    assert scores[:, 0, 0].tolist() == pytest.approx([0.5 * 0.8 + 0.1 * 0.5, 0.25 * 0.8 + 0.6 * 0.5])
    assert int(scores.argmax(0)) == 1
    batched = semantic_probs(class_logits[None].repeat(3, 1, 1), mask_logits[None].repeat(3, 1, 1, 1))
    assert batched.shape == (3, 2, 1, 1)


def test_set_loss_ignores_ignored_and_padded_pixels():
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, 8, 8, dtype=torch.long)
    ids[0, 2:5, 2:6] = 1
    ids[1, :, 4:] = 2
    ids[0, 0, :] = 255  # ignore
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, 6:] = False  # padding
    class_logits = torch.randn(2, 4, 4, generator=g)
    mask_logits = torch.randn(2, 4, 8, 8, generator=g)
    a = set_loss(class_logits, mask_logits, ids, valid, 255, W)
    changed = mask_logits.clone()
    changed[0, :, 0, :] = 50.0
    changed[1, :, 6:, :] = -50.0
    b = set_loss(class_logits, changed, ids, valid, 255, W)
    for key in ("loss", "ce", "bce", "dice"):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key


def test_set_loss_rewards_the_right_answer():
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    ids[0, :4] = 1
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    class_logits = torch.full((1, 3, 3), -8.0)
    class_logits[0, 0, 0] = class_logits[0, 1, 1] = class_logits[0, 2, 2] = 8.0  # q2 says "no object"
    mask_logits = torch.full((1, 3, 8, 8), -10.0)
    mask_logits[0, 0, 4:] = 10.0
    mask_logits[0, 1, :4] = 10.0
    good = set_loss(class_logits, mask_logits, ids, valid, 255, W)
    bad = set_loss(class_logits, -mask_logits, ids, valid, 255, W)
    assert float(good["loss"]) < 0.05 < float(bad["loss"])
    assert float(good["ce"]) < 1e-3


def test_confusion_metrics_hand_case_and_merge():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    m = ConfusionMetrics(("bg", "a", "b"), 255)
    m.update(pred, gt)
    # class 0: TP 1, FP 1 (gt 2 -> 0), FN 1 (gt 0 -> 1): IoU 1/3; class 1: TP 3, FP 1: 3/4; class 2: TP 1, FN 1: 1/2
    assert m.per_class_iou() == pytest.approx({"bg": 1 / 3, "a": 3 / 4, "b": 1 / 2})
    r = m.compute()
    assert r["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(5 / 7)
    assert r["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    other = ConfusionMetrics(("bg", "a", "b"), 255)
    other.update(pred[:, :2], gt[:, :2])
    other.update(pred[:, 2:], gt[:, 2:])
    assert np.array_equal(other.matrix, m.matrix)


def _spec(**kw):
    return ClassSpec.of(DataConfig(classes=list(VOC_CLASSES), **kw))


def test_voc_colormap():
    cmap = voc_colormap(21)
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0] and cmap[15].tolist() == [192, 128, 128]


def test_colour_coded_palette_and_id_masks(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "i.png")
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[1, :] = (128, 0, 0)  # aeroplane
    rgb[2, :] = (192, 128, 128)  # person
    rgb[3, :] = (224, 224, 192)  # boundary -> ignore
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    ids = np.array([[0] * 6, [1] * 6, [15] * 6, [255] * 6], np.uint8)
    pal = Image.fromarray(ids, "P")
    pal.putpalette(voc_colormap(256).reshape(-1).tolist())
    pal.save(tmp_path / "pal.png")
    Image.fromarray(ids).save(tmp_path / "grey.png")
    for mask in ("rgb.png", "pal.png", "grey.png"):
        _, got = load_pair(Pair(tmp_path / "i.png", tmp_path / mask, "i"), _spec())
        assert np.array_equal(got, ids), mask


def test_bad_class_masks_name_the_file(tmp_path):
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "i.png")
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match=r"odd.png: colour\(s\) \[\(1, 2, 3\)\] are not in the palette"):
        load_pair(Pair(tmp_path / "i.png", tmp_path / "odd.png", "i"), _spec())
    Image.fromarray(np.full((4, 6), 37, np.uint8)).save(tmp_path / "ids.png")
    with pytest.raises(DataError, match=r"ids.png: class id\(s\) \[37\] outside the 21 classes"):
        load_pair(Pair(tmp_path / "i.png", tmp_path / "ids.png", "i"), _spec())


@pytest.mark.parametrize("override, message", [
    ("data.palette=[[0,0,0]]", "1 colours for 2 classes"),
    ("data.ignore_index=1", "ignore_index: 1 is a class id"),
    ("data.palette=[[0,0,0],[0,0,300]]", r"\[0, 0, 300\] is not an RGB colour"),
    ("train.metric=sm", "'sm' is not a multi-class metric"),
])
def test_multiclass_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"classes": ["bg", "thing"]}}, [override])
    with pytest.raises(ConfigError, match="not a binary metric"):
        config_from_dict({}, ["train.metric=miou"])


def test_multiclass_model_shapes_and_parameters():
    cfg = tiny_config("conv_lora", data={"classes": ["bg", "a", "b"]}, model={"num_mask_tokens": 5})
    model = build_model(cfg).model
    out = model(torch.randn(2, 3, 64, 64))
    assert out.masks.shape == (2, 5, 16, 16) and out.class_logits.shape == (2, 5, 4)
    assert model.decoder.class_head.weight.requires_grad


def test_voc_samples_train_eval_predict(tmp_path):
    """Colour-coded VOC masks with the (224, 224, 192) boundary as ignore: train -> eval (mIoU) -> predict."""
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.infer.predict import predict_run
    from samft.engine.train.loop import train

    root = shared("voc-samples")
    cfg = tiny_config("conv_lora",
                      model={"num_mask_tokens": 6},
                      data={"root": str(root), "train": ".", "image_dir": "images", "mask_dir": "targets",
                            "classes": list(VOC_CLASSES), "val_fraction": 0.3},
                      train={"epochs": 2, "batch_size": 4, "lr": 1e-3, "progress": False},
                      output={"dir": str(tmp_path / "voc")})
    run = train(cfg, show_progress=False)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["val_mIoU", "val_mAcc", "val_pixel_acc"]
    results = evaluate_run(run, show_progress=False)
    val = results["sets"]["val"]
    assert val["n_images"] == 4
    assert set(val["metrics"]) == {"mIoU", "mAcc", "pixel_acc"} and 0 <= val["metrics"]["mIoU"] <= 1
    assert set(val["per_class_iou"]) == set(VOC_CLASSES)
    assert json.loads((run / "eval.json").read_text())["sets"]["val"]["metrics"] == val["metrics"]
    images = sorted((root / "images").glob("*.png"))[:2]
    written = predict_run(run, [str(p) for p in images], tmp_path / "pred", with_overlay=True, show_progress=False)
    for path, image in zip(written, images):
        with Image.open(path) as m, Image.open(image) as im:
            assert m.mode == "P" and m.size == im.size
            assert np.asarray(m).max() < 21
            assert m.getpalette()[3:6] == [128, 0, 0]  # class 1 shown in VOC's colour
        with Image.open(tmp_path / "pred" / "overlays" / path.name) as o:
            assert o.size[0] > im.size[0], "the overlay carries a legend"
