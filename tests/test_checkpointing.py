"""Activation checkpointing of the encoder blocks: same loss, same gradients, nothing stale left behind."""

from __future__ import annotations

import pytest
import torch

from samft.model import build_model
from samft.peft.inject import AdapterLayer

from conftest import METHODS, perturb_trainable, tiny_config


def _model(method, **sections):
    # every adapter part made to matter (zero-initialised parts included)
    return perturb_trainable(build_model(tiny_config(method, **sections)).model.train())


def _step(model, images, checkpointing):
    model.grad_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # same gate noise in both runs
    out = model(images)
    loss = out.masks.square().mean() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(out.aux_loss.detach()), grads


@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_loss_and_gradients(method):
    model = _model(method)
    images = torch.randn(3, 3, 64, 48)
    loss0, aux0, grads0 = _step(model, images, False)
    calls = []
    hooks = [blk.register_forward_hook(lambda *a: calls.append(1)) for blk in model.image_encoder.blocks]
    loss1, aux1, grads1 = _step(model, images, True)
    for h in hooks:
        h.remove()
    encoder_trains = any(p.requires_grad for p in model.image_encoder.parameters())
    # each block ran again in the backward pass (when anything in the encoder needs gradients)
    assert len(calls) == len(model.image_encoder.blocks) * (2 if encoder_trains else 1)
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-7)
    assert aux1 == pytest.approx(aux0, rel=1e-6, abs=1e-9)
    if method == "conv_lora":
        assert aux0 > 0
    assert grads1.keys() == grads0.keys()
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["conv_lora", "lora"])
def test_no_stale_loss_or_graph_after_backward(method):
    """The recomputation in backward must not leave a loss (holding its graph) on the layers."""
    model = _model(method, peft={"method": method, method: {"targets": ["qkv", "lin2"]}})
    model.grad_checkpointing = True
    out = model(torch.randn(2, 3, 64, 64))
    (out.masks.mean() + out.aux_loss).backward()
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 4
    assert all(m.aux_loss is None for m in layers)
    assert model._pending_aux == []


def test_checkpointing_only_in_training_with_grad():
    model = _model("conv_lora")
    model.grad_checkpointing = True
    calls = []
    for blk in model.image_encoder.blocks:
        blk.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    model.eval()
    model(torch.randn(1, 3, 64, 64)).masks.sum().backward()
    assert len(calls) == 2 * len(model.image_encoder.blocks)  # no recomputation: not checkpointed
