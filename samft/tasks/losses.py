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


BOUNDARY_KERNEL = 31


def box_mean(x: torch.Tensor, kernel: int = BOUNDARY_KERNEL) -> torch.Tensor:
    """``F.avg_pool2d(x, kernel, stride=1, padding=kernel // 2)`` (zero padding counted in the divisor) of a
    (..., H, W) tensor, from running sums: one cumulative sum down the columns and one along the rows, each
    window a difference of two sums, so the cost does not grow with the kernel (``scripts/bench_losses.py``).
    For 0/1 masks every sum is an exact integer, so the result is the pool's up to the final division's
    rounding (3e-8, any kernel; tested). For soft values the difference of two large float32 sums loses
    digits: within 1.2e-6 of the exact mean for 31 x 31 at 1024 px (the float32 pool: 1e-6), but 1e-5 for a
    3 x 3 window; pass float64 there (summed in float64)."""
    pad = kernel // 2
    h, w = x.shape[-2:]
    sums = F.pad(x, (0, 0, pad + 1, pad)).cumsum(-2)  # sums[i] = sum of the padded column up to i - 1
    cols = sums[..., kernel:, :] - sums[..., :h, :]
    sums = F.pad(cols, (pad + 1, pad)).cumsum(-1)
    return (sums[..., kernel:] - sums[..., :w]) / (kernel * kernel)


def boundary_weights(target: torch.Tensor) -> torch.Tensor:
    """``1 + 5 |avgpool31(gt) - gt|`` for (B, 1, H, W) targets (zero padding at the borders, as PraNet)."""
    return 1 + 5 * torch.abs(box_mean(target) - target)


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
    target_w = target * weights  # no gradient: two products of the prediction instead of four (same sums)
    inter = (prob * target_w).sum(dim=(2, 3))
    union = (prob * weights).sum(dim=(2, 3)) + target_w.sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (bce_term + wiou).mean()


# ---------------------------------------------------------------------------------------------
# Multi-class: MaskFormer-style set prediction (Hungarian matching of queries to present classes)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetLossWeights:
    """Weights of the loss terms and of the matching cost.

    ``ce``/``bce``/``dice`` weigh the loss (samft 10/5/5; AutoGluon sums HF Mask2FormerLoss's terms
    unweighted: 1/1/1). ``cost_*`` weigh the Hungarian matching cost; None = the loss weight (samft's
    behaviour; AutoGluon's matcher: class 1, mask 5, dice 5).
    """

    ce: float = 10.0
    bce: float = 5.0
    dice: float = 5.0
    no_object: float = 0.1
    cost_class: Optional[float] = None
    cost_mask: Optional[float] = None
    cost_dice: Optional[float] = None

    @classmethod
    def from_config(cls, loss) -> "SetLossWeights":
        """From a resolved ``loss`` config section (``cfg.loss``): its weights and ``loss.set.cost_*``."""
        return cls(loss.class_weight, loss.mask_bce_weight, loss.mask_dice_weight, loss.no_object_weight,
                   loss.set.cost_class, loss.set.cost_mask, loss.set.cost_dice)

    def costs(self) -> tuple[float, float, float]:
        """(class, mask BCE, mask Dice) weights of the matching cost."""
        pick = lambda cost, weight: weight if cost is None else cost  # noqa: E731
        return pick(self.cost_class, self.ce), pick(self.cost_mask, self.bce), pick(self.cost_dice, self.dice)


@dataclass(frozen=True)
class PointSampling:
    """Mask2Former's point-sampled mask losses (``loss.set.*``): ``points`` per mask, of which a fraction
    ``importance`` are the most uncertain of ``oversample * points`` uniform candidates, the rest uniform."""

    points: int = 12544
    oversample: float = 3.0
    importance: float = 0.75

    @classmethod
    def from_config(cls, set_cfg) -> Optional["PointSampling"]:
        """From a resolved ``loss.set`` section; None when ``points`` is 0 (every pixel)."""
        return cls(set_cfg.points, set_cfg.oversample, set_cfg.importance) if set_cfg.points else None


def point_sample(maps: torch.Tensor, coords: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear values of ``maps`` (N, C, H, W) at ``coords`` (N, P, 2), (x, y) in [0, 1] -> (N, C, P).

    ``grid_sample`` with ``align_corners=False`` and zero padding (Mask2Former's ``point_sample``): x = (j + 0.5) / W
    is the centre of column j, so a point at a pixel centre reads that pixel exactly, whatever the resolution.
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(maps.dtype)  # (N, P, 1, 2)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False).squeeze(3)


def kept_point_sample(targets: torch.Tensor, keep: torch.Tensor, coords: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets at points, interpolated over kept pixels only, and the kept share of each point.

    targets (T, 1, H, W) already zero where not kept; keep (1, 1, H, W) in {0, 1}; coords (1 or T, P, 2).
    Returns (values (T, P), share (1 or T, P)): the share (bilinear ``keep``, border padding: 1 up to the
    image's edge when every pixel is kept) weighs a point; the value is ``bilinear(targets) / share``, so a
    label under padding or ignore never leaks into a point next to it. With every pixel kept it is
    Mask2Former's plain ``point_sample`` of the target.
    """
    share = point_sample(keep.expand(len(coords), -1, -1, -1), coords, "border")[:, 0]
    values = point_sample(targets, coords.expand(len(targets), -1, -1))[:, 0]
    return (values / share.clamp_min(1e-6)).clamp(0.0, 1.0), share


def uncertain_points(logits: torch.Tensor, sampling: PointSampling,
                     generator: Optional[torch.Generator] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask2Former's importance sampling: (N, 1, H, W) logits -> (N, points, 2) coordinates in [0, 1].

    ``int(oversample * points)`` uniform candidates per map; the ``int(importance * points)`` with the
    smallest ``|logit|`` (the most uncertain) are kept, and uniform points fill up to ``points``. With
    ``keep`` (1, 1, H', W') in {0, 1}, a candidate with no kept pixel around it (padding, ignore) is never
    among the uncertain ones: it would carry no weight, and the logits there would choose the points.
    """
    n, device = logits.shape[0], logits.device
    candidates = torch.rand(n, int(sampling.points * sampling.oversample), 2, generator=generator, device=device)
    uncertainty = -point_sample(logits.float(), candidates)[:, 0].abs()  # (N, candidates)
    if keep is not None:
        share = point_sample(keep.expand(n, -1, -1, -1), candidates, "border")[:, 0]
        uncertainty = uncertainty.masked_fill(share <= 0, float("-inf"))
    k = int(sampling.importance * sampling.points)
    idx = torch.topk(uncertainty, k=k, dim=1).indices
    chosen = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    uniform = torch.rand(n, sampling.points - k, 2, generator=generator, device=device)
    return torch.cat([chosen, uniform], dim=1)


def pairwise_bce(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(Q, P) logits, (T, P) targets -> (Q, T) mean BCE of every query's mask against every target.

    ``weight`` (P,): a weighted mean over the points (sampled points on ignored pixels weigh 0).
    """
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    if weight is None:
        return (pos @ targets.T + neg @ (1 - targets).T) / max(1, logits.shape[1])
    return ((pos * weight) @ targets.T + (neg * weight) @ (1 - targets).T) / weight.sum().clamp_min(1e-12)


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(Q, P) logits, (T, P) targets -> (Q, T) Dice loss ``1 - (2 p.t + 1) / (sum p + sum t + 1)``
    (``weight`` (P,) scales each point's p and t)."""
    prob = logits.sigmoid()
    if weight is not None:
        prob, targets = prob * weight, targets * weight
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _assign(cost: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(cols, dtype=torch.long, device=device)


@torch.no_grad()
def match_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor, target_classes: torch.Tensor,
                  target_masks: torch.Tensor, w: SetLossWeights,
                  weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian matching (scipy's linear_sum_assignment) of Q queries to T targets.

    class_logits (Q, C+1), mask_logits (Q, P), target_classes (T,), target_masks (T, P) in [0, 1],
    weight (P,) or None. Cost = cost_class * (-p(class)) + cost_mask * BCE + cost_dice * Dice
    (``w.costs()``). Returns (query indices, target indices).
    """
    c_class, c_mask, c_dice = w.costs()
    prob = class_logits.float().softmax(-1)
    cost = (-c_class * prob[:, target_classes]
            + c_mask * pairwise_bce(mask_logits.float(), target_masks, weight)
            + c_dice * pairwise_dice(mask_logits.float(), target_masks, weight))
    return _assign(cost, class_logits.device)


def _mask_terms(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over M matched masks of the weighted mean BCE and of the Dice loss; logits, targets, weight (M, P)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    bce_sum = ((bce * weight).sum(-1) / weight.sum(-1).clamp_min(1e-12)).sum()
    prob, targets = logits.sigmoid() * weight, targets * weight
    dice = 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)
    return bce_sum, dice.sum()


def _image_sampled(class_logits: torch.Tensor, mask_logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor,
                   present: torch.Tensor, w: SetLossWeights, sampling: PointSampling,
                   generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image, point-sampled (Mask2Former): the matcher on ``points`` uniform points shared by every query
    and target, the matched masks' BCE/Dice on importance-sampled points. mask_logits (Q, h, w) at any
    resolution (normalised coordinates); ids, keep (H, W). Returns (rows, cols, bce sum, dice sum)."""
    q = mask_logits.shape[0]
    keep_map = keep.float()[None, None]  # (1, 1, H, W)
    targets = (ids[None] == present[:, None, None]).float()[:, None] * keep_map  # (T, 1, H, W), 0 where not kept
    logits = mask_logits.float()[:, None]  # (Q, 1, h, w)
    with torch.no_grad():
        coords = torch.rand(1, sampling.points, 2, generator=generator, device=mask_logits.device)
        t_pts, k_pts = kept_point_sample(targets, keep_map, coords)
        q_pts = point_sample(logits, coords.expand(q, -1, -1))[:, 0]
        rows, cols = match_queries(class_logits, q_pts, present, t_pts, w, k_pts[0])
        coords = uncertain_points(logits[rows], sampling, generator, keep_map)
        t_pts, k_pts = kept_point_sample(targets[cols], keep_map, coords)
    bce_sum, dice_sum = _mask_terms(point_sample(logits[rows], coords)[:, 0], t_pts, k_pts)
    return rows, cols, bce_sum, dice_sum


def set_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
             ignore_index: int, w: SetLossWeights, sampling: Optional[PointSampling] = None,
             generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """MaskFormer's loss for semantic segmentation.

    class_logits (B, Q, C+1); mask_logits (B, Q, H, W) at the label resolution; ids (B, H, W) class ids;
    valid (B, H, W) bool (padding is False). Each image's present classes are matched to queries; the
    class cross-entropy covers every query (unmatched ones -> "no object", weight ``w.no_object``), the
    mask BCE and Dice the matched pairs, averaged over the matched masks of the batch. Pixels with
    ``ignore_index`` or outside ``valid`` count nowhere.

    ``sampling`` (``loss.set.points`` > 0): Mask2Former's point-sampled version (see ``_image_sampled``);
    mask_logits may then have any resolution (e.g. the decoder's 256 x 256, which saves the memory of
    upsampling Q masks); sampled points weigh by the bilinear value of ``valid & not ignored`` there, so
    with no padding and no ignored pixel they are Mask2Former's plain means. ``generator`` draws the points.
    """
    b, q, c1 = class_logits.shape
    num_classes = c1 - 1
    target_cls = torch.full((b, q), num_classes, dtype=torch.long, device=class_logits.device)
    bce_sum = mask_logits.new_zeros((), dtype=torch.float32)
    dice_sum = mask_logits.new_zeros((), dtype=torch.float32)
    num_masks = 0
    for i in range(b):
        keep = valid[i] & (ids[i] != ignore_index)
        present = torch.unique(ids[i][keep])
        if present.numel() == 0:
            continue
        if sampling is not None and sampling.points > 0:
            rows, cols, bce_i, dice_i = _image_sampled(class_logits[i], mask_logits[i], ids[i], keep, present, w,
                                                       sampling, generator)
        else:
            labels = ids[i][keep]
            targets = (labels[None, :] == present[:, None]).float()  # (T, P)
            logits = mask_logits[i][:, keep].float()  # (Q, P)
            rows, cols = match_queries(class_logits[i], logits, present, targets, w)
            matched = logits[rows]
            bce_i = F.binary_cross_entropy_with_logits(matched, targets[cols], reduction="none").mean(-1).sum()
            dice_i = torch.diagonal(pairwise_dice(matched, targets[cols])).sum()
        target_cls[i, rows] = present[cols]
        bce_sum, dice_sum = bce_sum + bce_i, dice_sum + dice_i
        num_masks += len(rows)
    weight = torch.ones(c1, device=class_logits.device)
    weight[-1] = w.no_object
    ce = F.cross_entropy(class_logits.float().reshape(b * q, c1), target_cls.reshape(-1), weight=weight)
    n = max(1, num_masks)
    bce, dice = bce_sum / n, dice_sum / n
    return {"loss": w.ce * ce + w.bce * bce + w.dice * dice, "ce": ce, "bce": bce, "dice": dice}
