"""SPViT's gates against a restatement of the reference (zhuang-group/SPViT, ``SPViT_DeiT/models_pruning.py``).

The reference, restated here independently of ``samft.prune.gates``:

- ``bernoulli_sample(probs)``: uniforms ``u`` (clamped to [eps, 1 - eps], as ``probs``), relaxed logits
  ``logit(u) + logit(p)`` (temperature 1), forward ``y_hard = logits > 0`` (a Bernoulli(p) *keep* sample:
  ``P(logit(u) > -logit(p)) = P(u > 1 - p) = p``), straight-through ``y_hard - y_soft.detach() + y_soft``
  with ``y_soft = sigmoid(logits)``; so d gate / d theta = ``sigmoid'(logit(u) + theta) > 0`` for
  ``p = sigmoid(theta)``;
- ``single_path_init``: indicators ``cumprod`` of the (1x1, 3x3, MSA) samples, then "slow down the
  gradient for less-complex gates": when i1 and i2 are on, i1 is detached, and when i3 is on too, i2 is;
- the FFN's FLOPs indicators: ``(p > 0.5) - sigmoid(p - 0.5).detach() + sigmoid(p - 0.5)``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from samft.prune.gates import gate_values, nested, threshold_ste


def _clamp(x: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(x.dtype).eps
    return x.clamp(min=eps, max=1 - eps)


def ref_bernoulli_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    probs, uniforms = _clamp(probs), _clamp(uniforms)
    logits = uniforms.log() - (-uniforms).log1p() + probs.log() - (-probs).log1p()
    y_soft = torch.sigmoid(logits)
    y_hard = (logits > 0.0).float()
    return y_hard.detach() - y_soft.detach() + y_soft


def ref_single_path(kernel_indicators: torch.Tensor) -> torch.Tensor:
    ind = torch.cumprod(kernel_indicators, dim=0).clone()  # clone: in-place writes below, as the reference
    if ind[0] and ind[1]:
        ind[0] = ind[0].detach()
        if ind[2]:
            ind[1] = ind[1].detach()
    return ind


@pytest.mark.parametrize("p", [0.1, 0.3, 0.85, 0.97])
def test_sampled_gates_keep_with_probability_p(p):
    """Mean of n = 20 x 2000 samples (20 seeds) within 5 standard errors of p (a false alarm ~ 6e-7)."""
    theta = torch.full((2000,), math.log(p / (1 - p)))
    samples = []
    for seed in range(20):
        torch.manual_seed(seed)
        g = gate_values(theta, training=True)
        assert set(g.detach().unique().tolist()) <= {0.0, 1.0}  # exactly 0/1 forward
        samples.append(g.detach())
    mean = float(torch.cat(samples).mean())
    tolerance = 5 * math.sqrt(p * (1 - p) / (20 * 2000))
    assert abs(mean - p) <= tolerance, (mean, p, tolerance)
    assert gate_values(theta, training=False).tolist() == [float(p > 0.5)] * 2000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_gates_and_their_gradient_equal_the_reference(seed):
    theta = torch.linspace(-4, 4, 41, requires_grad=True)
    weights = torch.randn(41, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    ours = gate_values(theta, training=True)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), theta)

    torch.manual_seed(seed)
    uniforms = torch.rand(theta.shape)  # the draws the gate makes (one uniform per gate)
    ref_theta = theta.detach().clone().requires_grad_(True)
    ref = ref_bernoulli_sample(torch.sigmoid(ref_theta), uniforms)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), ref_theta)

    assert torch.equal(ours.detach(), ref.detach().round())  # same samples (the reference's are 0/1 up to rounding)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
    # straight through: d gate / d theta = sigmoid'(logit(u) + theta), positive (a larger threshold keeps more)
    logits = (uniforms.log() - (-uniforms).log1p() + theta.detach()).double()
    expected = (torch.sigmoid(logits) * torch.sigmoid(-logits)).float()
    torch.manual_seed(seed)
    (unit,) = torch.autograd.grad(gate_values(theta, training=True).sum(), theta)
    torch.testing.assert_close(unit, expected, rtol=1e-4, atol=1e-7)
    assert (unit > 0).all()


@pytest.mark.parametrize("gates", list(itertools.product([0.0, 1.0], repeat=3)))
def test_nested_indicators_slow_down_like_the_reference(gates):
    """Every hard (1x1, 3x3, MSA) pattern: the same indicators and the same gradients to the three gates."""
    weights = torch.tensor([0.7, -1.3, 2.1])  # a task loss that reaches every indicator
    ours_in = torch.tensor(gates, requires_grad=True)
    ours = nested(ours_in)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), ours_in)
    ref_in = torch.tensor(gates, requires_grad=True)
    ref = ref_single_path(ref_in)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), ref_in)
    assert ours.tolist() == ref.tolist()
    assert grad_ours.tolist() == grad_ref.tolist(), (gates, grad_ours, grad_ref)


def test_sampled_nested_gates_equal_the_reference_end_to_end():
    """gate_values + nested (a SearchBlock's attn_indicators) against bernoulli_sample + single_path_init,
    over seeds that between them sample every choice (skip, 1x1, 3x3, MSA)."""
    theta = torch.tensor([0.4, -0.2, 0.1], requires_grad=True)  # p near 1/2: the patterns vary with the seed
    weights = torch.tensor([0.5, 1.5, -2.0])
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        ours = nested(gate_values(theta, training=True))
        (grad_ours,) = torch.autograd.grad((ours * weights).sum(), theta)
        torch.manual_seed(seed)
        ref_theta = theta.detach().clone().requires_grad_(True)
        ref = ref_single_path(ref_bernoulli_sample(torch.sigmoid(ref_theta), torch.rand(3)))
        (grad_ref,) = torch.autograd.grad((ref * weights).sum(), ref_theta)
        assert ours.detach().tolist() == ref.detach().round().tolist(), seed
        torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")
        seen.add(int(ours.detach().sum()))
    assert seen == {0, 1, 2, 3}


def test_flops_indicators_equal_the_reference():
    theta = torch.linspace(-3, 3, 13, requires_grad=True)
    ours = threshold_ste(torch.sigmoid(theta))
    (grad_ours,) = torch.autograd.grad(ours.sum(), theta)
    ref_theta = theta.detach().clone().requires_grad_(True)
    p = torch.sigmoid(ref_theta)
    ref = (p > 0.5).float() - torch.sigmoid(p - 0.5).detach() + torch.sigmoid(p - 0.5)
    (grad_ref,) = torch.autograd.grad(ref.sum(), ref_theta)
    assert ours.detach().tolist() == (theta.detach() > 0).double().tolist()
    torch.testing.assert_close(grad_ours.float(), grad_ref, rtol=1e-5, atol=1e-7)
    assert (grad_ours > 0).all()
