"""peft.lora.init (pissa, olora) and peft.lora.variant (rslora, dora): restated directly, and held to HF peft."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from samft.config import validate
from samft.engine.artifacts.adapter import adapter_expectations, load_adapter, save_adapter
from samft.errors import ConfigError
from samft.model import build_model
from samft.peft.lora import LoRALinear

from conftest import perturb_trainable, tiny_config


def _base(out=7, inp=9, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out).double().requires_grad_(False)


def _peft_layer(base, rank, alpha, **kwargs):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear

    return Linear(copy.deepcopy(base), "default", peft.LoraConfig(r=rank, lora_alpha=alpha, **kwargs), r=rank,
                  lora_alpha=alpha, **kwargs)


def _grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), tensors)


@pytest.mark.parametrize("variant, kwargs", [("lora", {}), ("rslora", {"use_rslora": True}),
                                             ("dora", {"use_dora": True})])
def test_variants_equal_peft_forward_and_gradients_fp64(variant, kwargs):
    base = _base()
    ours = LoRALinear(copy.deepcopy(base), rank=3, alpha=5.0, variant=variant).double()
    theirs = _peft_layer(base, 3, 5.0, **kwargs).double()
    assert ours.scaling == pytest.approx(5.0 / (math.sqrt(3) if variant == "rslora" else 3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.lora_A.copy_(torch.randn(ours.lora_A.shape, generator=g, dtype=torch.float64))
        ours.lora_B.copy_(torch.randn(ours.lora_B.shape, generator=g, dtype=torch.float64))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        if variant == "dora":
            torch.testing.assert_close(ours.magnitude, theirs.lora_magnitude_vector["default"].weight, rtol=0,
                                       atol=1e-12)  # both start at the base's row norms
            ours.magnitude.mul_(1.5)
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    x = torch.randn(4, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mine, peft_out = ours(x), theirs(x)
    torch.testing.assert_close(mine, peft_out, rtol=0, atol=1e-10)
    own = [x, ours.lora_A, ours.lora_B] + ([ours.magnitude] if variant == "dora" else [])
    other = [x, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight] + (
        [theirs.lora_magnitude_vector["default"].weight] if variant == "dora" else [])
    for a, b in zip(_grads(mine, own), _grads(peft_out, other)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().merged()(x), mine, rtol=0, atol=1e-10)


def test_pissa_is_the_weights_principal_components_and_the_residual_stays_frozen():
    base = _base()
    weight = base.weight.clone()
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=4.0, init="pissa")
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    principal = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    torch.testing.assert_close(layer.scaling * layer.lora_B @ layer.lora_A, principal, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.base_layer.weight, weight - principal, rtol=0, atol=1e-12)
    assert not layer.base_layer.weight.requires_grad
    x = torch.randn(3, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-12)  # starts as the frozen layer
        torch.testing.assert_close(layer.merged().weight, weight, rtol=0, atol=1e-12)  # merging gives W back
        layer.lora_B.add_(0.1)
        torch.testing.assert_close(layer.merged().weight, weight - principal + layer.scaling * layer.lora_B @
                                   layer.lora_A, rtol=0, atol=1e-12)


def test_olora_is_the_weights_qr():
    base = _base()
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=4.0, init="olora")
    q, r = torch.linalg.qr(base.weight)
    torch.testing.assert_close(layer.lora_B, q[:, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.lora_A, r[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.merged().weight, base.weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", [{"init": "pissa", "variant": "dora"}, {"init": "olora"}, {"variant": "rslora"}])
def test_lora_options_start_as_the_frozen_model_and_round_trip(options, tmp_path):
    cfg = tiny_config("lora", peft={"method": "lora", "lora": options})
    built = build_model(cfg)
    frozen = build_model(tiny_config("decoder_only")).model.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(built.model.eval()(images).masks, frozen(images).masks, rtol=1e-4, atol=1e-5)
    trains = {n.rsplit(".", 1)[-1] for n, p in built.model.image_encoder.named_parameters() if p.requires_grad}
    assert trains == ({"lora_A", "lora_B", "magnitude"} if options.get("variant") == "dora" else {"lora_A", "lora_B"})
    perturb_trainable(built.model)
    save_adapter(built.model, tmp_path / "a.safetensors", adapter_expectations(cfg, built.base_sha256, built.model))
    again = build_model(cfg)
    load_adapter(again.model, tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(images).masks, built.model(images).masks, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, message", [({"variant": "dora"}, "variant: dora needs the adapted weight"),
                                              ({"init": "pissa"}, "init: pissa starts B non-zero")])
def test_conv_lora_refuses_what_has_no_meaning_for_it(options, message):
    with pytest.raises(ConfigError, match=f"^peft.conv_lora.{message}"):
        validate(tiny_config("conv_lora", peft={"method": "conv_lora", "conv_lora": options}))


def test_conv_lora_rslora_scale():
    model = build_model(tiny_config("conv_lora", peft={"method": "conv_lora", "conv_lora": {"variant": "rslora"}})).model
    assert model.image_encoder.blocks[0].attn.qkv.scaling == pytest.approx(32.0 / math.sqrt(3))


def test_lora_plus_gives_the_b_matrices_their_own_learning_rate():
    from samft.engine.train.setup import make_optimizer

    model = build_model(tiny_config("lora")).model
    plain = make_optimizer(model, 1e-3, 0.1)
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]  # as before: no extra group at ratio 1
    opt = make_optimizer(model, 1e-3, 0.1, lr_ratio_b=16.0)
    b = {id(p) for n, p in model.named_parameters() if n.endswith("lora_B")}
    (fast,) = [g for g in opt.param_groups if g["lr"] == pytest.approx(16e-3)]
    assert {id(p) for p in fast["params"]} == b and len(b) == 2 and fast["weight_decay"] == 0.1
    assert not b & {id(p) for g in opt.param_groups if g is not fast for p in g["params"]}
    with pytest.warns(UserWarning, match="train.lr_ratio_b=16.0 has no effect"):
        make_optimizer(build_model(tiny_config("ssf")).model, 1e-3, 0.1, lr_ratio_b=16.0)
