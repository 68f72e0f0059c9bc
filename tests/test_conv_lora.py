"""Conv-LoRA against a plain, loop-per-sample restatement of the paper's equations (arXiv 2401.17868:
``h = W0 x + s Wd(z + E_g(z))``, ``z = We x``, top-1 noisy gating, the balance loss), written here
independently of samft.peft.conv_lora: same forward, same balance loss, same gradients."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from samft.peft.conv_lora import ConvLoRAConfig, ConvLoRALinear
from samft.tasks.terms import aux_sink

from conftest import tiny_config


def make_layer(in_f=12, out_f=36, **options):
    torch.manual_seed(0)
    base = torch.nn.Linear(in_f, out_f)
    base.requires_grad_(False)
    layer = ConvLoRALinear(base, ConvLoRAConfig(**options))
    with torch.no_grad():  # make every part of the branch matter
        layer.lora_B.normal_(0, 0.5)
        layer.gate.w_gate.normal_(0, 3.0)
        layer.gate.w_noise.normal_(0, 1.0)
        for conv in layer.experts:
            conv.bias.normal_(0, 0.1)
    return layer


def plain_conv_lora(layer, x, noise, training):
    """h = W0 x + s Wd (z + sum_chosen g E_i(z)), z = We x, one sample at a time."""
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A, layer.lora_B
    wg, wn = layer.gate.w_gate, layer.gate.w_noise
    k, eps = layer.gate.top_k, layer.gate.noise_eps
    s = layer.scaling
    outs, chosen_gates, clean_all, noisy_all, std_all = [], [], [], [], []
    for n in range(x.shape[0]):
        xn = x[n]  # (H, W, C)
        H, W = xn.shape[:2]
        z = xn @ A.T  # (H, W, r)
        zbar = z.mean(dim=(0, 1))
        clean = zbar @ wg
        if training:
            std = F.softplus(zbar @ wn) + eps
            logits = clean + noise[n] * std
        else:
            std = None
            logits = clean
        top = torch.argsort(logits, descending=True)[:k]
        g = torch.softmax(logits[top], dim=0)
        mixed = torch.zeros_like(z)
        for j, e in enumerate(top.tolist()):
            scale = layer.scales[e]
            y = z.permute(2, 0, 1)[None]
            if scale != 1:
                y = F.interpolate(y, scale_factor=scale, mode="bicubic")
            y = F.gelu(F.conv2d(y, layer.experts[e].weight, layer.experts[e].bias, padding=1))
            if scale != 1:
                y = F.interpolate(y, size=(H, W), mode="bicubic")
            y = y[0].permute(1, 2, 0)
            mixed = mixed + (g[j] * y if layer.gate_scales_output else y)
        outs.append(xn @ W0.T + b0 + s * ((z + mixed) @ B.T))
        gates = torch.zeros_like(logits)
        gates[top] = g
        chosen_gates.append(gates)
        clean_all.append(clean)
        noisy_all.append(logits)
        std_all.append(std)
    return torch.stack(outs), torch.stack(chosen_gates), clean_all, noisy_all, std_all


def plain_balance_loss(gates, clean, noisy, std, k, experts, coef, training):
    """coef * (cv^2(importance) + cv^2(load)), with numpy/scipy; load from P(in top k) when noisy."""
    gates = gates.detach().numpy()
    importance = gates.sum(0)
    if training and k < experts:
        load = np.zeros(experts)
        for c, v, sd in zip(clean, noisy, std):
            c, v, sd = c.detach().numpy(), v.detach().numpy(), sd.detach().numpy()
            ordered = np.sort(v)[::-1]
            for e in range(experts):
                threshold = ordered[k] if v[e] > ordered[k] else ordered[k - 1]
                load[e] += norm.cdf((c[e] - threshold) / sd[e])
    else:
        load = (gates > 0).sum(0).astype(float)

    def cv2(a):
        return a.var(ddof=1) / (a.mean() ** 2 + 1e-10)

    return coef * (cv2(importance) + cv2(load))


def forward_with_balance(layer, x):
    """The layer's output and the balance loss it adds to an aux-loss sink opened around it."""
    with aux_sink() as sink:
        out = layer(x)
    return out, sink.values["balance"]


def test_no_balance_loss_is_computed_outside_a_sink():
    layer = make_layer().train()
    x = torch.randn(4, 4, 4, 12)
    torch.manual_seed(1)
    bare = layer(x)
    torch.manual_seed(1)
    inside, loss = forward_with_balance(layer, x)
    assert torch.equal(bare, inside) and loss > 0  # same output and gate noise either way
    assert layer.gate(torch.randn(4, 3, 4, 4), balance=False)[2] is None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options", [
    {},  # the reference: 8 experts at scales 1..8, top-1, outputs not scaled by the gate
    {"experts": 4, "scales": [1, 1.5, 2, 3], "top_k": 2, "gate_scales_output": True},
    {"experts": 3, "top_k": 3, "gate_scales_output": True},
])
def test_forward_and_balance_loss_match_the_plain_restatement(training, options):
    layer = make_layer(**options).train(training)
    x = torch.randn(6, 7, 5, 12)  # windows of a non-square map, like SAM's windowed blocks
    torch.manual_seed(123)
    out, loss = forward_with_balance(layer, x)
    torch.manual_seed(123)
    noise = torch.randn(6, len(layer.scales))
    ref, gates, clean, noisy, std = plain_conv_lora(layer, x, noise, training)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    expected = plain_balance_loss(gates, clean, noisy, std, layer.gate.top_k, len(layer.scales), 1e-2, training)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_several_experts_are_used():
    layer = make_layer().train()
    torch.manual_seed(0)
    idx, _, _ = layer.gate(torch.randn(64, 3, 4, 4))
    assert len(set(idx.flatten().tolist())) >= 4


def test_gradients_match_the_plain_restatement():
    layer = make_layer(experts=4, top_k=1).train()
    x = torch.randn(5, 6, 6, 12)
    upstream = torch.randn(5, 6, 6, 36)
    torch.manual_seed(7)
    (layer(x) * upstream).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad and p.grad is not None}
    layer.zero_grad()
    torch.manual_seed(7)
    noise = torch.randn(5, 4)
    ref, *_ = plain_conv_lora(layer, x, noise, True)
    (ref * upstream).sum().backward()
    for n, p in layer.named_parameters():
        if n in ours:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert {"lora_A", "lora_B"} <= set(ours)


def test_balance_loss_trains_the_router():
    """With top-1 and unscaled outputs the gate gets its gradient from the balance loss only."""
    layer = make_layer().train()
    x = torch.randn(16, 4, 4, 12)
    layer(x).sum().backward()
    assert layer.gate.w_gate.grad is None or torch.count_nonzero(layer.gate.w_gate.grad) == 0
    layer.zero_grad()
    forward_with_balance(layer, x)[1].backward()
    assert torch.count_nonzero(layer.gate.w_gate.grad) > 0
    assert torch.count_nonzero(layer.gate.w_noise.grad) > 0


def test_token_sequence_input_is_treated_as_a_square_map():
    layer = make_layer().eval()
    x = torch.randn(2, 4, 4, 12)
    torch.testing.assert_close(layer(x.reshape(2, 16, 12)), layer(x).reshape(2, 16, 36))
    with pytest.raises(ValueError, match="square token grid"):
        layer(torch.randn(2, 15, 12))


def test_model_collects_one_balance_loss_per_layer():
    from samft.model import build_model

    model = build_model(tiny_config("conv_lora")).model.train()
    out = model(torch.randn(4, 3, 64, 64))
    layers = [m for m in model.modules() if isinstance(m, ConvLoRALinear)]
    assert len(layers) == 2
    assert out.aux_loss > 0
    assert not any(hasattr(m, "aux_loss") for m in layers), "nothing is stored on the layers"
    out.aux_loss.backward()
    assert all(m.gate.w_gate.grad is not None for m in layers)


def test_parameter_count_per_layer():
    """vit_h qkv (1280 -> 3840), r=3, 8 experts: 15,360 LoRA + 8*(81+3) conv + 2*24 gate = 16,080."""
    base = torch.nn.Linear(1280, 3840, device="meta")
    layer = ConvLoRALinear(base, ConvLoRAConfig())
    assert sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base_layer")) == 16_080
    assert math.isclose(layer.scaling, 32 / 3)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options", [{}, {"experts": 4, "scales": [1, 1.5, 2, 3], "gate_scales_output": True}])
def test_reference_impl_equals_the_default_path(training, options):
    """impl=reference (AutoGluon's exp/log dispatcher, the benchmark baseline) and the default grouped
    path: same output (float32, rtol=atol=1e-5), balance loss and gradients (1e-5 of each gradient's
    largest entry)."""
    grouped = make_layer(**options).train(training)
    reference = make_layer(impl="reference", **options).train(training)
    reference.load_state_dict(grouped.state_dict())
    x = torch.randn(6, 7, 5, 12)
    upstream = torch.randn(6, 7, 5, 36)
    results = []
    for layer in (grouped, reference):
        torch.manual_seed(5)
        out, aux = forward_with_balance(layer, x)
        ((out * upstream).sum() + aux).backward()
        results.append((out.detach(), aux.detach(),
                        {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}))
    (out_g, aux_g, grads_g), (out_r, aux_r, grads_r) = results
    torch.testing.assert_close(out_r, out_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_r, aux_g)
    assert grads_r.keys() == grads_g.keys()
    for name, g in grads_g.items():  # sums over many positions: compared relative to the largest entry
        scale = g.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads_r[name] / scale, g / scale, rtol=0, atol=1e-5, msg=name)


def test_reference_impl_is_top1_only():
    from samft.errors import ConfigError

    with pytest.raises(ConfigError, match="peft.conv_lora.impl: reference .* top_k=2"):
        tiny_config("conv_lora", peft={"method": "conv_lora", "conv_lora": {"impl": "reference", "top_k": 2}})
