"""SLIP's self-supervision against the reference (facebookresearch/SLIP), restated independently.

- ``models.py`` ``SIMCLR.forward`` / ``SLIP.forward``: ``aug1_embed = image_mlp(visual(aug1))``,
  ``aug2_embed = image_mlp(visual(aug2))``: the projection MLP (Linear-BN-ReLU-Linear-BN-ReLU-Linear,
  ``_build_mlp``) runs once per view, so its BatchNorm normalises each view with that view's batch
  statistics (and updates its running statistics twice per step);
- ``losses.py`` ``SIMCLRLoss``: NT-Xent over both views, own similarity masked with -1e9;
- ``datasets.py`` ``get_dataset``'s SimCLR ``augment``: RandomResizedCrop(224, scale=(0.08, 1.)) (torchvision's
  default ratio (3/4, 4/3), bilinear), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
  RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5) (``utils.GaussianBlur``: PIL's
  Gaussian blur with radius = sigma ~ U(0.1, 2)), RandomHorizontalFlip() (p 0.5). samft crops to the
  model's input size instead of 224 and normalises as SAM.
"""

from __future__ import annotations

import cv2
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samft.slip.ssl as ssl_mod
from samft.slip.augment import TwoViewTransform
from samft.slip.ssl import SSLHead, ssl_loss

EPS, MOMENTUM = 1e-5, 0.1  # nn.SyncBatchNorm's defaults, as in SLIP's _build_mlp


class _IdentityEncoder(nn.Module):
    """A stand-in for the PEFT-adapted SAM: ``encode`` returns its input (B, C, h, w) feature maps."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def collect_aux_losses(self, feats):
        return {}


def _head(seed: int = 0) -> SSLHead:
    torch.manual_seed(seed)
    head = SSLHead(12, 20, 8).train()
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), so that they matter
        for bn in (head.mlp.bn1, head.mlp.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return head


def _bn(x, weight, bias):
    """Training-mode BatchNorm1d with the statistics of ``x`` itself (biased variance)."""
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    return (x - mean) / torch.sqrt(var + EPS) * weight + bias


def ref_image_mlp(head: SSLHead, x: torch.Tensor) -> torch.Tensor:
    """SLIP's _build_mlp forward on one batch (one view) with the head's weights, written out."""
    m = head.mlp
    x = F.relu(_bn(x @ m.layer1.weight.T + m.layer1.bias, m.bn1.weight, m.bn1.bias))
    x = F.relu(_bn(x @ m.layer2.weight.T + m.layer2.bias, m.bn2.weight, m.bn2.bias))
    return x @ m.layer3.weight.T + m.layer3.bias


def ref_simclr_loss(aug1_embed, aug2_embed, tau):
    q_a, q_b = F.normalize(aug1_embed, dim=-1, p=2), F.normalize(aug2_embed, dim=-1, p=2)
    n = q_a.shape[0]
    labels = torch.arange(n)
    masks = F.one_hot(labels, n) * 1e9
    logits_aa = q_a @ q_a.T / tau - masks
    logits_bb = q_b @ q_b.T / tau - masks
    logits_ab = q_a @ q_b.T / tau
    logits_ba = q_b @ q_a.T / tau
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


def _views(n: int = 6):
    g = torch.Generator().manual_seed(3)
    view1 = torch.randn(n, 12, 2, 2, generator=g)
    view2 = torch.randn(n, 12, 2, 2, generator=g) * 2 + 0.7  # different statistics per view
    return view1, view2


def test_projection_head_normalises_each_view_with_its_own_statistics(monkeypatch):
    head = _head()
    view1, view2 = _views()
    seen = {}
    real = ssl_mod.nt_xent

    def spy(z1, z2, temperature=0.1):
        seen["z"] = (z1.detach(), z2.detach())
        return real(z1, z2, temperature)

    monkeypatch.setattr(ssl_mod, "nt_xent", spy)
    loss = ssl_loss(_IdentityEncoder(), head, view1, view2, temperature=0.2)
    p1, p2 = view1.mean(dim=(2, 3)), view2.mean(dim=(2, 3))
    with torch.no_grad():
        e1, e2 = ref_image_mlp(head, p1), ref_image_mlp(head, p2)
        # the other variant: statistics over both views concatenated (one head call on 2N rows)
        both = ref_image_mlp(head, torch.cat([p1, p2]))
    torch.testing.assert_close(seen["z"][0], e1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["z"][1], e2, rtol=1e-5, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ref_simclr_loss(e1, e2, 0.2)), rel=1e-5, abs=1e-6)
    # the variants really differ here (so the comparison above can fail)
    assert (both[:6] - e1).abs().max() > 1e-2 and (both[6:] - e2).abs().max() > 1e-2
    assert abs(float(ref_simclr_loss(both[:6], both[6:], 0.2)) - float(loss.detach())) > 1e-3


def test_projection_head_running_statistics_follow_two_per_view_updates():
    """Two head calls per step, as SLIP: the running mean/var move twice, by view 1's then view 2's batch."""
    head = _head()
    view1, view2 = _views()
    m = head.mlp
    p1, p2 = view1.mean(dim=(2, 3)), view2.mean(dim=(2, 3))
    with torch.no_grad():
        h1, h2 = p1 @ m.layer1.weight.T + m.layer1.bias, p2 @ m.layer1.weight.T + m.layer1.bias
    mean, var = m.bn1.running_mean.clone(), m.bn1.running_var.clone()
    for h in (h1, h2):
        mean = (1 - MOMENTUM) * mean + MOMENTUM * h.mean(0)
        var = (1 - MOMENTUM) * var + MOMENTUM * h.var(0, unbiased=True)
    ssl_loss(_IdentityEncoder(), head, view1, view2)
    assert int(m.bn1.num_batches_tracked) == 2
    torch.testing.assert_close(m.bn1.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.bn1.running_var, var, rtol=1e-5, atol=1e-6)


# SLIP's SimCLR augmentation, as torchvision's parameters mean them, in SLIP's order
SLIP_AUGMENT = [
    ("RandomResizedCrop", {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "interpolation": "bilinear", "p": 1.0}),
    ("ColorJitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}),
    ("RandomGrayscale", {"p": 0.2}),
    ("GaussianBlur", {"sigma": (0.1, 2.0), "p": 0.5}),
    ("RandomHorizontalFlip", {"p": 0.5}),
]


def _as_slip(t) -> tuple[str, dict]:
    """An albumentations transform of TwoViewTransform, described in torchvision's terms."""
    name = type(t).__name__
    if name == "RandomResizedCrop":
        interp = {cv2.INTER_LINEAR: "bilinear", cv2.INTER_CUBIC: "bicubic", cv2.INTER_NEAREST: "nearest"}
        return name, {"scale": tuple(t.scale), "ratio": tuple(t.ratio), "interpolation": interp[t.interpolation],
                      "p": t.p}
    if name == "ColorJitter":  # albumentations keeps factor ranges: brightness [1 - b, 1 + b], hue [-h, h]
        out = {}
        for key in ("brightness", "contrast", "saturation"):
            lo, hi = getattr(t, key)
            assert lo == pytest.approx(max(0.0, 1 - (hi - 1)))
            out[key] = round(hi - 1, 6)
        lo, hi = t.hue
        assert lo == -hi
        return name, {**out, "hue": hi, "p": t.p}
    if name == "ToGray":
        assert t.num_output_channels == 3  # RandomGrayscale keeps the 3 channels
        return "RandomGrayscale", {"p": t.p}
    if name == "GaussianBlur":
        assert tuple(t.blur_limit) == (0, 0)  # kernel size from sigma, sigma a standard deviation like PIL's radius
        return name, {"sigma": tuple(t.sigma_limit), "p": t.p}
    if name == "HorizontalFlip":
        return "RandomHorizontalFlip", {"p": t.p}
    raise AssertionError(f"a transform SLIP does not have: {name}")


def test_the_two_view_augmentation_is_slips():
    transform = TwoViewTransform(32)
    assert [_as_slip(t) for t in transform.augment.transforms] == SLIP_AUGMENT
    crop = transform.augment.transforms[0]
    assert tuple(crop.size) == (32, 32)  # SLIP's 224 is samft's square model input
