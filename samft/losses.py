"""Losses for binary segmentation.

Structure loss (PraNet, used by the Conv-LoRA paper): weighted IoU + BCE, with pixel weights
``w = 1 + 5 |avgpool31(gt) - gt|`` that emphasise boundaries. The paper's text and the reference code
use a plain mean BCE (the reference passes the legacy ``reduce='none'``, which means "mean"):
``bce="mean"`` (default). ``bce="weighted"`` applies the boundary weights to the BCE as well.

Shadow detection (SBU) uses the balanced BCE of SAM-Adapter/AutoGluon (``bce="balanced"``, usually with
``iou=False``): positives weighted by #neg/#pos, the whole scaled by #pos/#all, with the counts pooled
over the batch as the reference (``MyWcploss`` of DSC) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


def boundary_weights(target: torch.Tensor) -> torch.Tensor:
    """``1 + 5 |avgpool31(gt) - gt|`` for (B, 1, H, W) targets (zero padding at the borders, as PraNet)."""
    return 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Over the batch: ``w * mean(BCE with pos_weight = #neg / #pos)``, ``w = #pos / (#pos + #neg)``.

    The counts and the mean are pooled over every valid pixel of the batch (``MyWcploss``: one
    ``BCEWithLogitsLoss(pos_weight=beta)`` on the whole batch); returns a scalar.
    """
    pos = (target * valid).sum() + 1e-10
    neg = ((1 - target) * valid).sum()
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    bce_map = -((neg / pos) * target * log_p + (1 - target) * log_not_p)
    mean = (bce_map * valid).sum() / valid.sum().clamp_min(1)
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


# ---------------------------------------------------------------------------------------------
# Multi-class: MaskFormer-style set prediction (Hungarian matching of queries to present classes)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetLossWeights:
    """Weights of the matching cost and of the loss (the reference's defaults)."""

    ce: float = 10.0
    bce: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (T, P) targets -> (Q, T) mean BCE of every query's mask against every target."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / max(1, logits.shape[1])


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (T, P) targets -> (Q, T) Dice loss ``1 - (2 p.t + 1) / (sum p + sum t + 1)``."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def match_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_classes: torch.Tensor,
                  target_masks: torch.Tensor, w: SetLossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching (scipy's linear_sum_assignment) of Q queries to T targets.

    class_logits (Q, C+1), mask_logits (Q, P), target_classes (T,), target_masks (T, P) in {0, 1}.
    Cost = ce * (-p(class)) + bce * BCE + dice * Dice. Returns (query indices, target indices).
    """
    from scipy.optimize import linear_sum_assignment

    prob = class_logits.float().softmax(-1)
    cost = (-w.ce * prob[:, target_classes]
            + w.bce * pairwise_bce(mask_logits.float(), target_masks)
            + w.dice * pairwise_dice(mask_logits.float(), target_masks))
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    device = class_logits.device
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long, device=device)


def set_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
             ignore_index: int, w: SetLossWeights) -> dict[str, torch.Tensor]:
    """MaskFormer's loss for semantic segmentation.

    class_logits (B, Q, C+1); mask_logits (B, Q, H, W) at the label resolution; ids (B, H, W) class ids;
    valid (B, H, W) bool (padding is False). Each image's present classes are matched to queries; the
    class cross-entropy covers every query (unmatched ones -> "no object", weight ``w.no_object``), the
    mask BCE and Dice the matched pairs, averaged over the matched masks of the batch. Pixels with
    ``ignore_index`` or outside ``valid`` count nowhere.
    """
    b, q, c1 = class_logits.shape
    num_classes = c1 - 1
    target_cls = torch.full((b, q), num_classes, dtype=torch.long, device=class_logits.device)
    bce_sum = mask_logits.new_zeros((), dtype=torch.float32)
    dice_sum = mask_logits.new_zeros((), dtype=torch.float32)
    num_masks = 0
    for i in range(b):
        keep = valid[i] & (ids[i] != ignore_index)
        labels = ids[i][keep]
        present = torch.unique(labels)
        if present.numel() == 0:
            continue
        targets = (labels[None, :] == present[:, None]).float()  # (T, P)
        logits = mask_logits[i][:, keep].float()  # (Q, P)
        rows, cols = match_queries(class_logits[i], logits, present, targets, w)
        target_cls[i, rows] = present[cols]
        matched = logits[rows]
        bce_sum = bce_sum + F.binary_cross_entropy_with_logits(matched, targets[cols], reduction="none").mean(-1).sum()
        dice_sum = dice_sum + torch.diagonal(pairwise_dice(matched, targets[cols])).sum()
        num_masks += len(rows)
    weight = torch.ones(c1, device=class_logits.device)
    weight[-1] = w.no_object
    ce = F.cross_entropy(class_logits.float().reshape(b * q, c1), target_cls.reshape(-1), weight=weight)
    n = max(1, num_masks)
    bce, dice = bce_sum / n, dice_sum / n
    return {"loss": w.ce * ce + w.bce * bce + w.dice * dice, "ce": ce, "bce": bce, "dice": dice}
