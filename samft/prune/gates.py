"""SPViT's gates: learnable thresholds, sampled in search, fixed after.

Every gate has a threshold ``theta`` (initialised at 1.5) and keep probability ``p = sigmoid(theta)``.

- In search (training mode) a gate is a Bernoulli(p) sample with the straight-through estimator: the
  forward value is the hard sample, the gradient that of its relaxed version ``sigmoid(logit(u) +
  logit(p))`` (``u`` uniform), as the reference's ``bernoulli_sample``.
- In evaluation and after search a gate is ``p > 0.5`` (``theta > 0``).
- For the FLOPs loss the reference uses the *current* architecture, ``p > 0.5``, with the gradient of
  ``sigmoid(p - 0.5)`` (straight through): the loss then sees the FLOPs of the architecture the search
  would return now, not an expectation that can differ from it by whole blocks.
- The attention gates of a block are nested: indicators are the cumulative product of its three gates
  ``(g1x1, g3x3, gmsa)``, so ``i1 >= i2 >= i3`` (skip < 1x1 < 3x3 < MSA). As in the reference, when a
  more complex option is on, the gradient of the task loss to the less complex gates below it is
  stopped ("slow down the gradient for less-complex gates"), so it trains the highest active gate.
"""

from __future__ import annotations

import torch


def bernoulli_ste(probs: torch.Tensor) -> torch.Tensor:
    """A hard Bernoulli(probs) sample (0/1, same shape) with the relaxed sample's gradient."""
    eps = torch.finfo(probs.dtype).eps
    p = probs.clamp(eps, 1 - eps)
    u = torch.rand_like(p).clamp(eps, 1 - eps)
    logits = u.log() - (-u).log1p() + p.log() - (-p).log1p()
    soft = torch.sigmoid(logits)
    return (logits > 0).to(p.dtype) + (soft - soft.detach())  # exactly 0/1 forward


def threshold_ste(probs: torch.Tensor) -> torch.Tensor:
    """``probs > 0.5`` (0/1, float64: exact) with the gradient of ``sigmoid(probs - 0.5)``: the FLOPs loss's
    indicators."""
    probs = probs.double()
    soft = torch.sigmoid(probs - 0.5)
    return (probs > 0.5).double() + (soft - soft.detach())


def gate_values(thresholds: torch.Tensor, training: bool) -> torch.Tensor:
    """Sampled (training) or fixed (``sigmoid(theta) > 0.5``) gates, one per threshold."""
    probs = torch.sigmoid(thresholds)
    return bernoulli_ste(probs) if training else (probs > 0.5).to(probs.dtype)


def nested(gates: torch.Tensor, slow_down: bool = True) -> torch.Tensor:
    """(3,) gates (1x1, 3x3, MSA) -> (3,) cumulative indicators ``(i1, i2, i3)``; with ``slow_down``, the
    task-loss gradient of ``i1`` is stopped while ``i2`` is on and that of ``i2`` while ``i3`` is on."""
    ind = torch.cumprod(gates, dim=0)
    if not slow_down:
        return ind
    i1, i2, i3 = ind.unbind(0)
    on = ind.detach() > 0.5
    i1 = torch.where(on[0] & on[1], i1.detach(), i1)
    i2 = torch.where(on[1] & on[2], i2.detach(), i2)
    return torch.stack([i1, i2, i3])


def mixer_weights(ind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights of (MSA, 3x3, 1x1) in the block's output: ``i3``, ``i2 (1 - i3)``, ``i1 (1 - i2)(1 - i3)``."""
    i1, i2, i3 = ind.unbind(0)
    return i3, i2 * (1 - i3), i1 * (1 - i2) * (1 - i3)


CHOICES = ("skip", "conv1", "conv3", "msa")


def choice(ind: torch.Tensor) -> str:
    """Hard (3,) indicators -> ``skip``, ``conv1``, ``conv3`` or ``msa``."""
    return CHOICES[int((ind.detach() > 0.5).sum())]
