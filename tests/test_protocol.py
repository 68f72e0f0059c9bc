"""The paper's protocol on demand: ``protocol: samft | autogluon`` and each of its switches on a hand-built case.

Expected values are written out here (not read from samft.config.protocol.OPTIONS), so a changed table fails a test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samft.config import config_from_dict, dump_yaml
from samft.data.transforms import SamTransform, nearest_indices, squash_image, squash_mask
from samft.engine.train.schedule import lr_factor
from samft.errors import ConfigError
from samft.tasks.losses import (PointSampling, SetLossWeights, kept_point_sample, match_queries, point_sample, set_loss,
                          uncertain_points)
from samft.tasks.metrics import BinaryMetrics, ConfusionMetrics, image_ber, per_class_all_iou
from samft.constants import PIXEL_MEAN, PIXEL_STD
from samft.config.protocol import OPTIONS, apply_protocol, differences, summary

SAMFT = {"data.resize": "pad", "eval.resize_gt_to_input": False, "eval.miou": "dataset", "eval.ber": "pooled",
         "train.batch_size": 4, "train.accum_steps": 1, "train.adam_eps": 1e-8, "train.schedule": "linear",
         "loss.aux.balance": 1.0, "loss.class_weight": 10.0, "loss.mask_bce_weight": 5.0,
         "loss.mask_dice_weight": 5.0, "loss.set.points": 0, "loss.set.cost_class": 10.0,
         "loss.set.cost_mask": 5.0, "loss.set.cost_dice": 5.0}
AUTOGLUON = {"data.resize": "squash", "eval.resize_gt_to_input": True, "eval.miou": "per_class_all",
             "eval.ber": "per_image", "train.batch_size": 1, "train.accum_steps": 4, "train.adam_eps": 1e-6,
             "train.schedule": "poly", "loss.aux.balance": 1.0, "loss.class_weight": 1.0,
             "loss.mask_bce_weight": 1.0, "loss.mask_dice_weight": 1.0, "loss.set.points": 12544,
             "loss.set.cost_class": 1.0, "loss.set.cost_mask": 5.0, "loss.set.cost_dice": 5.0}
# an explicit value for each option that neither protocol uses
EXPLICIT = {"data.resize": "squash", "eval.resize_gt_to_input": True, "eval.miou": "per_class_all",
            "eval.ber": "per_image", "train.batch_size": 3, "train.accum_steps": 2, "train.adam_eps": 1e-7,
            "train.schedule": "linear", "loss.aux.balance": 0.5, "loss.class_weight": 2.0,
            "loss.mask_bce_weight": 3.0, "loss.mask_dice_weight": 4.0, "loss.set.points": 100,
            "loss.set.cost_class": 2.0, "loss.set.cost_mask": 3.0, "loss.set.cost_dice": 4.0}


def get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# ----------------------------------------------------------------------------------------------- config


def test_the_tables_cover_every_protocol_option():
    assert set(SAMFT) == set(AUTOGLUON) == set(EXPLICIT) == set(OPTIONS)


@pytest.mark.parametrize("protocol, expected", [("samft", SAMFT), ("autogluon", AUTOGLUON)])
def test_protocol_sets_every_option(protocol, expected):
    cfg = config_from_dict({"protocol": protocol})
    assert {k: get(cfg, k) for k in OPTIONS} == expected
    assert differences(cfg) == {}


def test_samft_protocol_is_todays_behaviour_and_the_papers_balance_weight():
    binary, multi = config_from_dict({}), config_from_dict({"data": {"classes": ["bg", "thing"]}})
    assert (binary.loss.aux.balance, multi.loss.aux.balance) == (1.0, 2.0)  # the paper's text
    assert config_from_dict({"protocol": "autogluon", "data": {"classes": ["bg", "thing"]}}).loss.aux.balance == 1.0
    # samft's matcher costs follow the loss weights, as before the options existed
    cfg = config_from_dict({}, ["loss.class_weight=3", "loss.mask_dice_weight=7"])
    assert (cfg.loss.set.cost_class, cfg.loss.set.cost_mask, cfg.loss.set.cost_dice) == (3.0, 5.0, 7.0)


@pytest.mark.parametrize("protocol", ["samft", "autogluon"])
@pytest.mark.parametrize("dotted", sorted(EXPLICIT))
def test_explicit_options_win_over_the_protocol(protocol, dotted):
    value = EXPLICIT[dotted]
    cfg = config_from_dict({"protocol": protocol}, [f"{dotted}={value}"])
    assert get(cfg, dotted) == value
    others = {k: get(cfg, k) for k in OPTIONS if k != dotted and not k.startswith("loss.set.cost")}
    table = SAMFT if protocol == "samft" else AUTOGLUON
    assert others == {k: table[k] for k in others}
    assert (dotted in differences(cfg)) == (value != table[dotted])


def test_protocol_is_recorded_and_a_resolved_config_round_trips():
    cfg = config_from_dict({"protocol": "autogluon"}, ["train.adam_eps=1e-8"])
    data = yaml.safe_load(dump_yaml(cfg))
    assert data["protocol"] == "autogluon" and data["train"]["adam_eps"] == 1e-8
    again = config_from_dict(data)
    assert dump_yaml(again) == dump_yaml(cfg)
    assert differences(again) == {"train.adam_eps": (1e-8, 1e-6)}
    assert summary(again) == "protocol autogluon, with your train.adam_eps=1e-08 (the protocol's: 1e-06)"
    assert summary(config_from_dict({})) == "protocol samft"
    assert apply_protocol(again) is again and dump_yaml(again) == dump_yaml(cfg)  # idempotent


@pytest.mark.parametrize("override, message", [
    ("protocol=autogloun", r"protocol: 'autogloun' is not one of samft, autogluon \(did you mean 'autogluon'\?\)"),
    ("data.resize=stretch", r"data.resize: 'stretch' is not one of pad, squash"),
    ("eval.miou=all", r"eval.miou: 'all' is not one of dataset, per_class_all"),
    ("eval.ber=mean", r"eval.ber: 'mean' is not one of pooled, per_image"),
    ("train.schedule=cosine", r"train.schedule: 'cosine' is not one of linear, poly"),
    ("loss.set.importance=1.5", r"loss.set.importance: 1.5 must be in \[0, 1\]"),
    ("loss.set.points=-1", r"loss.set.points: -1 is below the minimum 0"),
])
def test_bad_protocol_values_name_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


# --------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("warmup, min_ratio", [(0, 0.0), (0, 0.1), (5, 0.0), (5, 0.2)])
def test_poly_with_power_one_is_the_linear_schedule(warmup, min_ratio):
    total = 40
    for step in range(total + 3):
        assert lr_factor(step, warmup, total, min_ratio, "poly", 1.0) == pytest.approx(
            lr_factor(step, warmup, total, min_ratio, "linear"), abs=1e-12)


def test_the_training_parts_use_the_protocols_optimizer_and_schedule():
    """build_training: AdamW's eps is train.adam_eps and the LambdaLR follows train.schedule/poly_power."""
    import torch

    from samft.engine.train.setup import build_training

    from conftest import tiny_config

    cfg = tiny_config("lora", train={"adam_eps": 1e-6, "schedule": "poly", "poly_power": 2.0, "lr": 1.0})
    parts = build_training(cfg, torch.device("cpu"), "fp32", total_steps=10)
    assert all(g["eps"] == 1e-6 for g in parts.optimizer.param_groups)
    assert parts.scheduler.lr_lambdas[0](5) == pytest.approx(lr_factor(5, 0, 10, 0.0, "poly", 2.0))
    assert parts.scheduler.lr_lambdas[0](5) == pytest.approx(0.25)


def test_poly_power_two_is_hf_polynomial_decay():
    lr, lr_end, total = 1e-4, 1e-6, 50  # HF: (lr - lr_end) * (1 - t) ** power + lr_end, over lr
    for step in range(total):
        expected = ((lr - lr_end) * (1 - step / total) ** 2 + lr_end) / lr
        assert lr_factor(step, 0, total, lr_end / lr, "poly", 2.0) == pytest.approx(expected, rel=1e-12)
    assert lr_factor(25, 0, 50, 0.0, "poly", 2.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown schedule 'cos'"):
        lr_factor(0, 0, 10, 0.0, "cos")


# -------------------------------------------------------------------------------------------- geometry


def test_nearest_is_pil_nearest():
    rng = np.random.default_rng(0)
    for h, w, size in [(37, 53, 64), (300, 200, 64), (5, 3, 16), (1023, 1025, 256)]:
        mask = rng.integers(0, 256, (h, w)).astype(np.uint8)
        assert np.array_equal(squash_mask(mask, size), np.asarray(Image.fromarray(mask).resize((size, size),
                                                                                              Image.NEAREST)))
    assert nearest_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert nearest_indices(8, 4).tolist() == [1, 3, 5, 7]  # the centre of each pair, rounded up


def test_squash_geometry_fills_the_square_and_keeps_the_aspect_nowhere():
    h, w, size = 30, 50, 64
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :25] = 200  # left half bright
    mask = np.zeros((h, w), np.uint8)
    mask[:, :25] = 1
    mask[:3] = 255  # an ignore band on top
    out = SamTransform(size, 0.0, resize="squash")(image, mask)
    assert out["image"].shape == (3, size, size) and out["valid_hw"].tolist() == [size, size]
    got = out["mask"].numpy()
    assert (got[:, :32] != 0).all() and (got[7:, 32:] == 0).all()  # 25/50 of the width = 32/64
    assert (got[:6] == 255).all() and (got[7:] != 255).all()  # 3/30 of the height = 6.4/64 rows
    # the image is PIL's bicubic resize, then SAM's normalisation
    pixels = out["image"].numpy().transpose(1, 2, 0) * np.array(PIXEL_STD) + np.array(PIXEL_MEAN)
    assert np.allclose(pixels, squash_image(image, size), atol=1e-3)
    ref = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    assert np.array_equal(squash_image(image, size), ref)
    # the padded geometry is unchanged: longest side to 64, the rest padding
    pad = SamTransform(size, 0.0)(image, mask)
    assert pad["valid_hw"].tolist() == [38, 64] and (pad["mask"].numpy()[38:] == 0).all()


def test_squash_flips_before_resizing_like_autogluon():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (21, 34, 3)).astype(np.uint8)
    mask = rng.integers(0, 3, (21, 34)).astype(np.uint8)
    flipped = SamTransform(32, hflip=1.0, resize="squash")(image, mask, seed=0)
    plain = SamTransform(32, 0.0, resize="squash")(np.ascontiguousarray(image[:, ::-1]),
                                                   np.ascontiguousarray(mask[:, ::-1]))
    assert torch.equal(flipped["mask"], plain["mask"]) and torch.equal(flipped["image"], plain["image"])


def test_unknown_resize_is_an_error():
    with pytest.raises(ValueError, match="unknown resize 'crop'"):
        SamTransform(32, resize="crop")


# --------------------------------------------------------------------------------------------- metrics

CLASSES = ("bg", "a", "b", "c")  # c is absent everywhere


def _confusion_case():
    gt = np.array([[0, 0, 1, 1],
                   [0, 255, 1, 2]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 2]])
    return pred, gt


def test_autogluon_miou_on_a_small_confusion_case():
    pred, gt = _confusion_case()
    m = ConfusionMetrics(CLASSES, 255, miou="per_class_all")
    m.update(pred, gt)
    # by hand: bg tp 2, pred 3, gt 3 -> 2/4; a tp 2, pred 3, gt 3 -> 2/4; b tp 1, pred 1 + 1 on the ignored
    # pixel, gt 1 -> 1/2; c absent -> 0. Mean over all four classes.
    assert m.per_class_iou() == {"bg": 0.5, "a": 0.5, "b": 0.5, "c": 0.0}
    assert m.compute()["mIoU"] == pytest.approx(1.5 / 4)
    # samft's: the ignored pixel nowhere (b: 1/1) and the absent class left out
    d = ConfusionMetrics(CLASSES, 255)
    d.update(pred, gt)
    assert d.per_class_iou() == {"bg": 0.5, "a": 0.5, "b": 1.0, "c": None}
    assert d.compute()["mIoU"] == pytest.approx(2.0 / 3)
    assert m.compute()["pixel_acc"] == d.compute()["pixel_acc"]


def _autogluon_histc_iou(preds, gts, num_classes):
    """AutoGluon's Multiclass_IoU restated: torch.histc of prediction, label and intersection (labels + 1)."""
    inter_total, union_total = torch.zeros(num_classes), torch.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        predict = torch.as_tensor(pred).float() + 1
        target = torch.as_tensor(gt).float() + 1
        predict = predict * (target > 0).float()
        intersection = predict * (predict == target).float()
        area_inter = torch.histc(intersection, bins=num_classes, min=1, max=num_classes)
        area_pred = torch.histc(predict, bins=num_classes, min=1, max=num_classes)
        area_lab = torch.histc(target, bins=num_classes, min=1, max=num_classes)
        inter_total += area_inter
        union_total += area_pred + area_lab - area_inter
    return (inter_total / (2.220446049250313e-16 + union_total)).double().numpy()


def test_autogluon_miou_equals_its_histc_restatement_and_merges_exactly():
    rng = np.random.default_rng(2)
    preds = [rng.integers(0, 4, (9, 7)) for _ in range(5)]
    gts = []
    for _ in range(5):
        gt = rng.integers(0, 3, (9, 7))  # class 3 never in the ground truth
        gt[rng.random((9, 7)) < 0.2] = 255
        gts.append(gt)
    whole = ConfusionMetrics(CLASSES, 255, miou="per_class_all")
    parts = [ConfusionMetrics(CLASSES, 255, miou="per_class_all") for _ in range(2)]
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.update(p, g)
        parts[i % 2].update(p, g)
    parts[0].merge(parts[1])
    expected = _autogluon_histc_iou(preds, gts, 4)
    # the restatement divides in float32, as AutoGluon's torch states
    assert np.allclose(list(whole.per_class_iou().values()), expected, rtol=0, atol=1e-7)
    assert whole.compute()["mIoU"] == pytest.approx(float(np.mean(expected)), abs=1e-7)
    assert parts[0].compute() == whole.compute()
    assert np.array_equal(per_class_all_iou(whole.matrix, whole.ignored_pred), list(whole.per_class_iou().values()))


def test_per_image_ber_on_hand_built_images():
    # image 1 perfect; image 2 no foreground, one pixel of 4 predicted foreground: the foreground class is seen
    # (fp) with recall 0/0 = 0, background recall 3/4 -> 100 (1 - 0.375); image 3 no foreground anywhere -> 0
    assert image_ber(2, 2, 2, 2) == 0.0
    assert image_ber(0, 3, 0, 4) == pytest.approx(62.5)
    assert image_ber(0, 4, 0, 4) == 0.0
    assert image_ber(1, 1, 2, 2) == pytest.approx(50.0)  # (1/2 + 1/2) / 2
    images = [(np.array([[1.0, 1.0], [0.0, 0.0]]), np.array([[1, 1], [0, 0]], bool)),
              (np.array([[1.0, 0.0], [0.0, 0.0]]), np.zeros((2, 2), bool)),
              (np.zeros((2, 2)), np.zeros((2, 2), bool))]
    per_image, pooled = BinaryMetrics(0.5, ber="per_image"), BinaryMetrics(0.5)
    for i, (prob, gt) in enumerate(images):
        per_image.update(prob, gt, str(i))
        pooled.update(prob, gt, str(i))
    assert per_image.compute()["BER"] == pytest.approx(62.5 / 3)
    # pooled: tp 2 / pos 2, tn 9 / neg 10 -> 100 (1 - (1 + 0.9) / 2) = 5
    assert pooled.compute()["BER"] == pytest.approx(5.0)
    assert per_image.compute()["Sm"] == pooled.compute()["Sm"]


# ---------------------------------------------------------------------------------------------- losses


def test_point_sample_reads_pixel_centres_exactly_at_any_resolution():
    maps = torch.randn(2, 3, 5, 7)
    rows, cols = torch.tensor([0, 4, 2, 3]), torch.tensor([6, 0, 3, 1])
    coords = torch.stack([(cols + 0.5) / 7, (rows + 0.5) / 5], dim=-1).expand(2, -1, -1)
    assert torch.allclose(point_sample(maps, coords), maps[:, :, rows, cols], atol=1e-6)


def test_targets_are_interpolated_over_kept_pixels_only():
    keep = torch.tensor([[[[1.0, 0.0]]]])  # a 1 x 2 image whose right pixel is padding
    targets = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 1.0]]]]) * keep
    coords = torch.tensor([[[0.5, 0.5], [0.25, 0.5], [0.75, 0.5]]])  # the boundary, the left and the right centre
    values, share = kept_point_sample(targets, keep, coords)
    assert share.tolist() == [[0.5, 1.0, 0.0]]
    assert values.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    full = torch.ones_like(keep)  # all kept: Mask2Former's point_sample (zero padding at the image's edge)
    values, share = kept_point_sample(targets, full, torch.tensor([[[0.0, 0.5]]]))
    assert share.tolist() == [[1.0]] and values[0].tolist() == [0.5]


def test_uncertain_points_keep_the_most_uncertain_candidates():
    logits = torch.randn(3, 1, 16, 16) * 4
    sampling = PointSampling(points=20, oversample=3.0, importance=0.75)
    coords = uncertain_points(logits, sampling, torch.Generator().manual_seed(5))
    assert coords.shape == (3, 20, 2) and coords.min() >= 0 and coords.max() <= 1
    replay = torch.Generator().manual_seed(5)
    candidates = torch.rand(3, 60, 2, generator=replay)
    uniform = torch.rand(3, 5, 2, generator=replay)
    values = point_sample(logits, candidates)[:, 0].abs()
    for i in range(3):
        chosen = set(map(tuple, coords[i, :15].tolist()))
        smallest = set(map(tuple, candidates[i, values[i].argsort()[:15]].tolist()))
        assert chosen == smallest
    assert torch.equal(coords[:, 15:], uniform)
    none = uncertain_points(logits, PointSampling(20, 3.0, 0.0), torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    torch.rand(3, 60, 2, generator=replay)  # the candidates, none kept
    assert torch.equal(none, torch.rand(3, 20, 2, generator=replay))


def _bilinear(image: np.ndarray, x: float, y: float) -> float:
    """grid_sample(align_corners=False, zero padding) at (x, y) in [0, 1], restated on a numpy (H, W) map."""
    h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for dy, dx in itertools.product((0, 1), (0, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < w and 0 <= yi < h:
            total += weight * image[yi, xi]
    return total


def _direct_sampled_loss(class_logits, mask_logits, ids, sampling, seed, cost=(1.0, 5.0, 5.0)):
    """The 1:1:1 Mask2Former loss for one image, written out: brute-force matching over permutations, numpy
    bilinear sampling, the generator replayed in the loss's order (matcher points, candidates, uniform)."""
    g = torch.Generator().manual_seed(seed)
    q, present = mask_logits.shape[0], sorted(set(ids.ravel().tolist()))
    targets = [(ids == c).astype(np.float64) for c in present]
    pts = torch.rand(1, sampling.points, 2, generator=g)[0].double().numpy()
    prob = torch.softmax(torch.as_tensor(class_logits, dtype=torch.float64), -1).numpy()
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    bce = lambda z, t: np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))  # noqa: E731

    def sample(m, coords):
        return np.array([_bilinear(m, x, y) for x, y in coords])

    def dice(z, t):
        return 1 - (2 * (sig(z) * t).sum() + 1) / (sig(z).sum() + t.sum() + 1)

    zq = [sample(mask_logits[j], pts) for j in range(q)]
    tt = [sample(t, pts) for t in targets]
    best = None
    for perm in itertools.permutations(range(q), len(present)):
        c = sum(-cost[0] * prob[j, present[t]] + cost[1] * bce(zq[j], tt[t]).mean() + cost[2] * dice(zq[j], tt[t])
                for t, j in enumerate(perm))
        best = (c, perm) if best is None or c < best[0] else best
    perm = best[1]
    rows = sorted(range(len(perm)), key=lambda t: perm[t])  # targets in the order of their queries
    m = len(present)
    n_cand, k = int(sampling.points * sampling.oversample), int(sampling.importance * sampling.points)
    cand = torch.rand(m, n_cand, 2, generator=g).double().numpy()
    uniform = torch.rand(m, sampling.points - k, 2, generator=g).double().numpy()
    bce_sum = dice_sum = 0.0
    for i, t in enumerate(rows):
        z = mask_logits[perm[t]]
        order = np.argsort(np.abs(sample(z, cand[i])), kind="stable")[:k]
        coords = np.concatenate([cand[i][order], uniform[i]])
        zs, ts = sample(z, coords), sample(targets[t], coords)
        bce_sum += bce(zs, ts).mean()
        dice_sum += dice(zs, ts)
    labels = np.full(q, prob.shape[1] - 1)
    for t, j in enumerate(perm):
        labels[j] = present[t]
    weights = np.where(labels == prob.shape[1] - 1, 0.1, 1.0)
    ce = (weights * -np.log(prob[np.arange(q), labels])).sum() / weights.sum()
    return ce + bce_sum / m + dice_sum / m, perm


def test_point_sampled_one_one_one_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    q, h = 4, 8
    class_logits = torch.randn(1, q, 4)  # 3 classes + no object
    mask_logits = torch.randn(1, q, h, h) * 3
    ids = torch.zeros(1, h, h, dtype=torch.long)
    ids[0, :4, :5] = 1
    ids[0, 6:, 2:] = 2
    sampling = PointSampling(points=24, oversample=3.0, importance=0.75)
    w = SetLossWeights(1.0, 1.0, 1.0, 0.1, cost_class=1.0, cost_mask=5.0, cost_dice=5.0)
    out = set_loss(class_logits, mask_logits, ids, torch.ones_like(ids, dtype=torch.bool), 255, w, sampling,
                   torch.Generator().manual_seed(11))
    expected, _ = _direct_sampled_loss(class_logits[0].numpy(), mask_logits[0].double().numpy(), ids[0].numpy(),
                                       sampling, 11)
    assert float(out["loss"]) == pytest.approx(expected, abs=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["ce"] + out["bce"] + out["dice"]), abs=1e-6)


def test_point_sampled_loss_works_on_low_resolution_logits_and_ignores_what_it_should():
    torch.manual_seed(1)
    class_logits = torch.randn(2, 5, 3, requires_grad=True)
    low = torch.randn(2, 5, 8, 8, requires_grad=True)  # the decoder's resolution, labels at 32
    ids = torch.randint(0, 2, (2, 32, 32))
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, :, 24:] = False  # padding
    ids[:, :, 24:] = 1  # labels under the padding must not matter
    sampling = PointSampling(64, 3.0, 0.75)
    w = SetLossWeights(1.0, 1.0, 1.0)
    out = set_loss(class_logits, low, ids, valid, 255, w, sampling, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and low.grad.abs().sum() > 0 and class_logits.grad.abs().sum() > 0
    ids2 = ids.clone()
    ids2[:, :, 24:] = 0
    again = set_loss(class_logits, low, ids2, valid, 255, w, sampling, torch.Generator().manual_seed(0))
    assert float(again["loss"].detach()) == float(out["loss"].detach())


def test_points_zero_is_the_all_pixel_loss():
    torch.manual_seed(2)
    args = (torch.randn(2, 4, 3), torch.randn(2, 4, 16, 16), torch.randint(0, 2, (2, 16, 16)),
            torch.ones(2, 16, 16, dtype=torch.bool), 255, SetLossWeights())
    plain, zero = set_loss(*args), set_loss(*args, PointSampling(points=0))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)


@pytest.mark.parametrize("protocol, weights, sampling", [
    ("samft", SetLossWeights(10.0, 5.0, 5.0, 0.1, 10.0, 5.0, 5.0), None),
    ("autogluon", SetLossWeights(1.0, 1.0, 1.0, 0.1, 1.0, 5.0, 5.0), PointSampling(12544, 3.0, 0.75)),
])
def test_loss_objects_from_the_config(protocol, weights, sampling):
    cfg = config_from_dict({"protocol": protocol, "data": {"classes": ["bg", "a"]}})
    assert SetLossWeights.from_config(cfg.loss) == weights
    assert PointSampling.from_config(cfg.loss.set) == sampling


def test_matcher_uses_its_own_costs():
    # query 0 is confident of class 0 but its mask is class 1's; query 1 the other way round
    masks = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # targets of classes 0 and 1
    mask_logits = torch.tensor([[8.0, 8.0, -8.0, -8.0], [-8.0, -8.0, 8.0, 8.0]])
    class_logits = torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])
    classes = torch.tensor([0, 1])
    by_class = SetLossWeights(ce=1.0, bce=1.0, dice=1.0, cost_class=100.0, cost_mask=0.1, cost_dice=0.1)
    by_mask = SetLossWeights(ce=100.0, bce=0.1, dice=0.1, cost_class=1.0, cost_mask=5.0, cost_dice=5.0)
    rows, cols = match_queries(class_logits, mask_logits, classes, masks, by_class)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 0, 1: 1}
    rows, cols = match_queries(class_logits, mask_logits, classes, masks, by_mask)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}
    # unset costs follow the loss weights (samft's matcher as it always was)
    assert SetLossWeights(10.0, 5.0, 5.0).costs() == (10.0, 5.0, 5.0)
    assert SetLossWeights(1.0, 1.0, 1.0, cost_class=1.0, cost_mask=5.0, cost_dice=5.0).costs() == (1.0, 5.0, 5.0)


# ------------------------------------------------------------------------------------------ end to end


def test_tiny_autogluon_run_trains_evaluates_and_predicts(tmp_path, synthetic_dir):
    """protocol=autogluon end to end on the tiny SAM (the evaluation side reads the protocol's options)."""
    from conftest import TINY
    from samft.data.datasets import EvalDataset
    from samft.data.layouts import folder_pairs
    from samft.engine.infer.evaluate import evaluate_run
    from samft.engine.infer.predict import predict_run
    from samft.engine.train.loop import train

    cfg = config_from_dict({"protocol": "autogluon", "model": dict(TINY), "peft": {"method": "conv_lora"},
                            "data": {"root": str(synthetic_dir), "train": ".", "val_fraction": 0.2, "num_workers": 0,
                                     "check": "quick"},
                            "train": {"epochs": 1, "max_steps": 2, "metric": "ber", "progress": False,
                                      "device": "cpu"},
                            "output": {"dir": str(tmp_path / "run")}})
    assert (cfg.train.batch_size, cfg.train.accum_steps, cfg.data.resize) == (1, 4, "squash")
    run = train(cfg, show_progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["protocol"] == "autogluon" and saved["data"]["resize"] == "squash"
    results = evaluate_run(run, show_progress=False)
    assert (results["protocol"], results["scoring"], results["resize"], results["ber"]) == (
        "autogluon", "input_size", "squash", "per_image")
    metrics = results["sets"]["val"]["metrics"]
    assert 0 <= metrics["BER"] <= 100 and 0 <= metrics["Sm"] <= 1
    pairs = folder_pairs(synthetic_dir / "images", synthetic_dir / "masks")[:1]
    assert EvalDataset(pairs, 64, resize="squash")[0]["valid_hw"].tolist() == [64, 64]
    written = predict_run(run, [str(pairs[0].image)], tmp_path / "pred", show_progress=False)
    with Image.open(written[0]) as m, Image.open(pairs[0].image) as im:
        assert m.size == im.size  # squashed in, back to the image's own size out


@pytest.mark.parametrize("protocol, costs, sampling", [("samft", (10.0, 5.0, 5.0), None),
                                                       ("autogluon", (1.0, 5.0, 5.0), PointSampling(12544, 3.0, 0.75))])
def test_the_task_carries_the_protocols_loss_and_metrics(protocol, costs, sampling):
    from samft.tasks.task import make_task

    task = make_task(config_from_dict({"protocol": protocol, "data": {"classes": ["bg", "a"]}}))
    assert task.weights.costs() == costs and task.sampling == sampling
    assert task.new_metrics().miou == ("dataset" if protocol == "samft" else "per_class_all")
    binary = make_task(config_from_dict({"protocol": protocol}))
    assert binary.new_metrics().ber == ("pooled" if protocol == "samft" else "per_image")
    torch.manual_seed(0)
    ids = torch.randint(0, 2, (1, 32, 32))
    loss = task.loss(torch.randn(1, 10, 32, 32), torch.randn(1, 10, 3), ids, None)
    assert torch.isfinite(loss)
