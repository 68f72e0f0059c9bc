"""Activation checkpointing of the encoder blocks: same loss, same gradients, nothing stale left behind."""

from __future__ import annotations

import pytest
import torch

from samft.model import build_model
from samft.peft.inject import AdapterLayer

from conftest import METHODS, check_checkpointing, perturb_trainable, tiny_config


def _model(method, **sections):
    # every adapter part made to matter (zero-initialised parts included)
    return perturb_trainable(build_model(tiny_config(method, **sections)).model.train())


@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_loss_and_gradients(method):
    aux0, _ = check_checkpointing(_model(method), torch.randn(3, 3, 64, 48))
    if method == "conv_lora":
        assert aux0 > 0


def aux_values_kept(model):
    """Every module attribute named like an auxiliary loss that holds a value (a tensor, a non-empty list/dict)."""
    kept = []
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            holds = isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple, dict)) and len(value) > 0)
            if "aux" in key.lower() and holds:
                kept.append(f"{name or 'model'}.{key}")
    return kept


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", ["conv_lora", "lora"])
def test_no_module_keeps_an_aux_value_after_a_step(method, checkpointing):
    """Nothing is stored on a module to be collected later (the recomputation in backward included)."""
    model = _model(method, peft={"method": method, method: {"targets": ["qkv", "lin2"]}})
    model.grad_checkpointing = checkpointing
    out = model(torch.randn(2, 3, 64, 64))
    assert aux_values_kept(model) == []
    (out.masks.mean() + out.aux_loss).backward()
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 4
    assert aux_values_kept(model) == []
    model.encode(torch.randn(2, 3, 64, 64)).mean().backward()  # a bare encode (SLIP's SSL pass)
    assert aux_values_kept(model) == []


def test_balance_term_is_the_same_with_and_without_checkpointing():
    """Conv-LoRA's balance value and its gradients on the gates: bit-identical under checkpointing."""
    model = _model("conv_lora", peft={"method": "conv_lora", "conv_lora": {"targets": ["qkv", "lin2"]}})
    images = torch.randn(3, 3, 64, 48)
    runs = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        balance = model(images).aux_losses["balance"]
        balance.backward()
        runs.append((balance.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, grads_plain), (ckpt, grads_ckpt) = runs
    assert float(plain) > 0 and torch.equal(plain, ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() and any(".gate." in n for n in grads_plain)
    for name, g in grads_plain.items():
        assert torch.equal(grads_ckpt[name], g), name


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
