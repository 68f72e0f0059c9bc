"""Losses for binary segmentation.

Structure loss (PraNet, used by the Conv-LoRA paper): weighted IoU + BCE, with pixel weights
``w = 1 + 5 |avgpool31(gt) - gt|`` that emphasise boundaries. The paper's text and the reference code
use a plain mean BCE (the reference passes the legacy ``reduce='none'``, which means "mean"):
``bce="mean"`` (default). ``bce="weighted"`` applies the boundary weights to the BCE as well.

Shadow detection (SBU) uses the balanced BCE of SAM-Adapter/AutoGluon (``bce="balanced"``, usually with
``iou=False``): positives weighted by #neg/#pos, the whole scaled by #pos/#all, counted per image.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def boundary_weights(target: torch.Tensor) -> torch.Tensor:
    """``1 + 5 |avgpool31(gt) - gt|`` for (B, 1, H, W) targets (zero padding at the borders, as PraNet)."""
    return 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per image: ``w_neg * mean(BCE with pos_weight = #neg / #pos)``, ``w_neg = #pos / (#pos + #neg)``."""
    pos = (target * valid).sum(dim=(2, 3)) + 1e-10
    neg = ((1 - target) * valid).sum(dim=(2, 3))
    pos_weight = (neg / pos)[:, :, None, None]
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    bce_map = -(pos_weight * target * log_p + (1 - target) * log_not_p)
    mean = (bce_map * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp_min(1)
    return mean * pos / (pos + neg)


def structure_loss(logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None,
                   bce: str = "mean", iou: bool = True) -> torch.Tensor:
    """Weighted IoU + BCE. logits, target: (B, 1, H, W); valid: (B, 1, H, W) in {0, 1} or None.

    Pixels outside ``valid`` (the padding added to square the input) count for nothing.
    """
    logits = logits.float()
    target = target.float()
    if valid is None:
        valid = torch.ones_like(target)
    weights = boundary_weights(target) * valid
    if bce == "balanced":
        bce_term = balanced_bce(logits, target, valid)
    else:
        bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if bce == "mean":
            bce_term = (bce_map * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp_min(1)
        elif bce == "weighted":
            bce_term = (bce_map * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp_min(1e-12)
        else:
            raise ValueError(f"unknown bce mode {bce!r}")
    if not iou:
        return bce_term.mean()
    prob = torch.sigmoid(logits)
    inter = (prob * target * weights).sum(dim=(2, 3))
    union = ((prob + target) * weights).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (bce_term + wiou).mean()
