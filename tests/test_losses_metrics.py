import math

import numpy as np
import py_sod_metrics as sod
import pytest
import torch

from samft.data.io import read_binary_mask
from samft.tasks.losses import structure_loss
from samft.tasks.metrics import BinaryMetrics, canonical, dice_iou, higher_is_better

from conftest import shared


def _bce(x, t):
    return math.log1p(math.exp(x)) - t * x


def test_structure_loss_hand_computed_mean_bce():
    """2x2 target [[1,0],[0,0]], logits 0: avgpool31 (zero padded) is 1/961 everywhere."""
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    logits = torch.zeros_like(target)
    w1, w0 = 1 + 5 * (960 / 961), 1 + 5 * (1 / 961)
    inter = 0.5 * w1
    union = 1.5 * w1 + 3 * 0.5 * w0
    expected = math.log(2) + 1 - (inter + 1) / (union - inter + 1)
    assert float(structure_loss(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_structure_loss_hand_computed_weighted_bce_and_padding():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
    pooled = 2 / 961
    w = {1.0: 1 + 5 * (1 - pooled), 0.0: 1 + 5 * pooled}
    px = [(2.0, 1.0), (-1.0, 0.0), (0.0, 0.0), (3.0, 1.0)]
    weights = [w[t] for _, t in px]
    sig = [1 / (1 + math.exp(-x)) for x, _ in px]
    inter = sum(p * t * wi for p, (_, t), wi in zip(sig, px, weights))
    union = sum((p + t) * wi for p, (_, t), wi in zip(sig, px, weights))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    wbce = sum(wi * _bce(x, t) for (x, t), wi in zip(px, weights)) / sum(weights)
    assert float(structure_loss(logits, target, bce="weighted")) == pytest.approx(wbce + wiou, rel=1e-6)
    mean_bce = sum(_bce(x, t) for x, t in px) / 4
    assert float(structure_loss(logits, target, bce="mean")) == pytest.approx(mean_bce + wiou, rel=1e-6)

    # only the left column is valid: the right column (padding) must not count
    valid = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    keep = [0, 2]
    inter_v = sum(sig[i] * px[i][1] * weights[i] for i in keep)
    union_v = sum((sig[i] + px[i][1]) * weights[i] for i in keep)
    expected_v = sum(_bce(*px[i]) for i in keep) / 2 + 1 - (inter_v + 1) / (union_v - inter_v + 1)
    assert float(structure_loss(logits, target, valid)) == pytest.approx(expected_v, rel=1e-6)


def test_structure_loss_prefers_the_right_answer():
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:20, 10:24] = 1
    good = structure_loss(target * 12 - 6, target)
    bad = structure_loss(6 - target * 12, target)
    assert float(good) < 0.05 < float(bad)


def test_dice_iou_hand_cases():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    assert dice_iou(a, b) == (0.5, 1 / 3)
    empty = np.zeros((2, 2), bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)
    assert dice_iou(a, np.zeros_like(a)) == (0.0, 0.0)


def test_metric_names_and_directions():
    assert canonical("sm") == "Sm" and canonical("dice") == "dice@0.5" and canonical("wFm") == "wFm"
    assert higher_is_better("dice") and not higher_is_better("mae")


def test_perfect_prediction():
    gt = np.zeros((40, 50), bool)
    gt[10:30, 5:25] = True
    m = BinaryMetrics()
    m.update(gt.astype(np.float32), gt, "a")
    r = m.compute()
    assert r["dice@0.5"] == 1 and r["iou@0.5"] == 1 and r["MAE"] == 0
    assert r["Sm"] == pytest.approx(1.0) and r["wFm"] == pytest.approx(1.0)
    assert r["meanEm"] > 0.99  # the curve's top threshold (255) selects nothing for a 0/1 map


def test_metrics_equal_pysodmetrics_on_real_masks():
    """Our accumulator against pysodmetrics called directly, on real EM masks with degraded predictions."""
    root = shared("em-cells")
    rng = np.random.default_rng(0)
    ours = BinaryMetrics()
    sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(), sod.MAE()
    dices = []
    for i in range(4):
        gt = read_binary_mask(root / "Labels" / f"{i}.png")
        prob = np.clip(gt * 0.7 + rng.uniform(0, 0.5, gt.shape), 0, 1).astype(np.float32)
        ours.update(prob, gt, str(i))
        pred = np.clip(np.round(prob * 255), 0, 255).astype(np.uint8)
        for metric in (sm, em, wfm, mae):
            metric.step(pred, gt.astype(np.uint8) * 255)
        inter = np.logical_and(prob >= 0.5, gt).sum()
        dices.append(2 * inter / ((prob >= 0.5).sum() + gt.sum()))
    r = ours.compute()
    assert r["Sm"] == pytest.approx(sm.get_results()["sm"], abs=1e-12)
    assert r["meanEm"] == pytest.approx(em.get_results()["em"]["curve"].mean(), abs=1e-12)
    assert r["wFm"] == pytest.approx(wfm.get_results()["wfm"], abs=1e-12)
    assert r["MAE"] == pytest.approx(mae.get_results()["mae"], abs=1e-12)
    assert r["dice@0.5"] == pytest.approx(np.mean(dices))


def test_merge_equals_one_pass():
    rng = np.random.default_rng(1)
    items = []
    for i in range(5):
        gt = rng.uniform(size=(20, 24)) > 0.6
        items.append((rng.uniform(size=gt.shape).astype(np.float32), gt, str(i)))
    whole = BinaryMetrics()
    parts = [BinaryMetrics(), BinaryMetrics()]
    for i, (p, g, n) in enumerate(items):
        whole.update(p, g, n)
        parts[i % 2].update(p, g, n)
    parts[0].merge(parts[1])
    assert len(parts[0]) == 5
    for k, v in whole.compute().items():
        assert parts[0].compute()[k] == pytest.approx(v)


def _np_structure_loss(logits, target, valid, bce):
    """An independent numpy restatement of the structure loss (per image, then the mean over the batch)."""
    from scipy.ndimage import uniform_filter

    out = []
    for x, t, v in zip(logits, target, valid):  # (H, W) each
        w = (1 + 5 * np.abs(uniform_filter(t, 31, mode="constant") - t)) * v
        p = 1 / (1 + np.exp(-x))
        bce_map = -(t * np.log(p) + (1 - t) * np.log(1 - p))
        if bce == "mean":
            b = (bce_map * v).sum() / max(v.sum(), 1)
        else:
            b = (bce_map * w).sum() / w.sum()
        inter, union = (p * t * w).sum(), ((p + t) * w).sum()
        out.append(b + 1 - (inter + 1) / (union - inter + 1))
    return float(np.mean(out))


def _np_balanced_bce(logits, target, valid):
    """MyWcploss restated: counts and mean pooled over the valid pixels of the whole batch."""
    pos, neg = (target * valid).sum() + 1e-10, ((1 - target) * valid).sum()
    p = 1 / (1 + np.exp(-logits))
    bce_map = -((neg / pos) * target * np.log(p) + (1 - target) * np.log(1 - p))
    return float((bce_map * valid).sum() / valid.sum() * pos / (pos + neg))


@pytest.mark.parametrize("bce", ["mean", "weighted"])
def test_structure_loss_equals_an_independent_restatement_on_a_padded_batch(bce):
    """Two different images, different valid (unpadded) areas, one of a single pixel: per-image reduction."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (2, 1, 40, 36))
    target = (rng.random((2, 1, 40, 36)) > 0.6).astype(np.float64)
    valid = np.zeros_like(target)
    valid[0, :, :30, :20] = 1
    valid[1, :, 5, 7] = 1  # one valid pixel
    got = structure_loss(torch.tensor(logits), torch.tensor(target), torch.tensor(valid), bce, iou=True)
    want = _np_structure_loss(logits[:, 0], target[:, 0], valid[:, 0], bce)
    assert float(got) == pytest.approx(want, rel=1e-6)  # the loss computes in float32


def test_balanced_bce_equals_an_independent_restatement():
    from samft.tasks.losses import balanced_bce

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (3, 1, 12, 10))
    target = (rng.random((3, 1, 12, 10)) > 0.8).astype(np.float64)
    valid = (rng.random((3, 1, 12, 10)) > 0.3).astype(np.float64)
    got = balanced_bce(torch.tensor(logits), torch.tensor(target), torch.tensor(valid))
    assert float(got) == pytest.approx(_np_balanced_bce(logits, target, valid), rel=1e-6)


def _plain_boundary_weights(target):
    """The 2-D 31 x 31 pool the separable one replaces (PraNet's formula, zero padding in the divisor)."""
    import torch.nn.functional as F

    return 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)


@pytest.mark.parametrize("shape", [(1, 1, 40, 40), (3, 1, 64, 96), (2, 1, 17, 130), (1, 1, 9, 12)])
def test_running_sum_boundary_weights_equal_the_plain_pool(shape):
    """Binary masks: within 1e-6 (the sums are exact; only the division may round differently), borders
    included, and images smaller than the 31 x 31 window."""
    from samft.tasks.losses import boundary_weights

    torch.manual_seed(0)
    target = (torch.rand(shape) > 0.6).float()
    target[..., :5, :] = 1  # a border of foreground: the zero padding matters there
    assert torch.allclose(boundary_weights(target), _plain_boundary_weights(target), atol=1e-6, rtol=0)


def test_running_sum_box_mean_equals_the_pool_for_soft_values_and_other_kernels():
    """31 x 31 on soft values: within 1e-6 of avg_pool2d computed in float64 (as the float32 pool itself);
    0/1 masks with any kernel: within 1e-7 (exact sums); float64 input is summed in float64 (1e-12)."""
    import torch.nn.functional as F

    from samft.tasks.losses import box_mean

    torch.manual_seed(2)
    x = torch.rand(2, 3, 57, 200)
    exact = F.avg_pool2d(x.double(), 31, stride=1, padding=15)
    got = box_mean(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), exact, atol=1e-6, rtol=0)
    binary = (x > 0.5).float()
    for kernel in (1, 3, 31):
        plain = F.avg_pool2d(binary.double(), kernel, stride=1, padding=kernel // 2)
        assert torch.allclose(box_mean(binary, kernel).double(), plain, atol=1e-7, rtol=0)
    x64 = x.double()
    got = box_mean(x64)
    assert got.dtype == torch.float64
    assert torch.allclose(got, F.avg_pool2d(x64, 31, stride=1, padding=15), atol=1e-12, rtol=0)


@pytest.mark.parametrize("bce", ["mean", "weighted", "balanced"])
@pytest.mark.parametrize("iou", [True, False])
def test_structure_loss_with_running_sum_weights_equals_the_plain_pool(bce, iou, monkeypatch):
    """Every place the weights are used (weighted IoU, weighted BCE, balanced BCE; padded batch): the same loss
    as with the plain 2-D pool, within 1e-6 relative."""
    import samft.tasks.losses as losses

    torch.manual_seed(1)
    logits = torch.randn(3, 1, 48, 72) * 3
    target = (torch.rand(3, 1, 48, 72) > 0.7).float()
    valid = torch.ones_like(target)
    valid[1, :, 40:, :] = 0
    valid[2, :, :, 60:] = 0
    fast = structure_loss(logits, target, valid, bce=bce, iou=iou)
    monkeypatch.setattr(losses, "boundary_weights", _plain_boundary_weights)
    plain = structure_loss(logits, target, valid, bce=bce, iou=iou)
    assert float(fast) == pytest.approx(float(plain), rel=1e-6)


def _plain_structure_loss(logits, target, valid, bce, iou):
    """The structure loss as PraNet writes it: 2-D pool weights, wiou from prob*target*w and (prob+target)*w."""
    import torch.nn.functional as F

    from samft.tasks.losses import balanced_bce

    weights = _plain_boundary_weights(target) * valid
    if bce == "balanced":
        term = balanced_bce(logits, target, valid)
    else:
        bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        w = valid if bce == "mean" else weights
        term = (bce_map * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3))
    if not iou:
        return term.mean()
    prob = torch.sigmoid(logits)
    inter = (prob * target * weights).sum(dim=(2, 3))
    union = ((prob + target) * weights).sum(dim=(2, 3))
    return (term + 1 - (inter + 1) / (union - inter + 1)).mean()


@pytest.mark.parametrize("bce", ["mean", "weighted", "balanced"])
@pytest.mark.parametrize("iou", [True, False])
def test_structure_loss_and_its_gradient_equal_the_plain_formulation(bce, iou):
    """Value and gradient against PraNet's formulation (2-D pool, four products of the prediction), on a
    padded batch at 96 x 128: within 1e-5 relative (float32 sums in another order)."""
    torch.manual_seed(3)
    logits = (torch.randn(3, 1, 96, 128) * 3).requires_grad_(True)
    target = (torch.rand(3, 1, 96, 128) > 0.7).float()
    valid = torch.ones_like(target)
    valid[1, :, 80:, :] = 0
    valid[2, :, :, 100:] = 0
    ours = structure_loss(logits, target, valid, bce=bce, iou=iou)
    (g_ours,) = torch.autograd.grad(ours, logits)
    plain = _plain_structure_loss(logits, target, valid, bce, iou)
    (g_plain,) = torch.autograd.grad(plain, logits)
    assert float(ours.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-4, atol=1e-9)
