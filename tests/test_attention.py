"""The attention registry: every implementation equals segment_anything's own Attention.

Tolerances: float64 1e-10 (the same function, summed in another order), float32 rtol=atol=2e-5,
bfloat16 on CUDA rtol=atol=2e-2 against the float32 result of segment_anything's attention.
"""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from samft.errors import ConfigError
from samft.model import build_model
from samft.model.attention import (EncoderAttention, attention_impl, attention_names, convert_attention,
                                   set_attention)
from samft.model.attention.sdpa import SDPAAttention
from samft.peft.lora import LoRALinear

from conftest import METHODS, sam_attention, tiny_config

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def make_pair(dim=48, heads=3, input_size=(4, 6), lora=False, dtype=torch.float32, device="cpu"):
    """(eager, sdpa) copies of one Attention with random weights and rel-pos tables."""
    attn = sam_attention(dim, heads, input_size, lora).to(device=device, dtype=dtype)
    fast = convert_attention(copy.deepcopy(attn), "sdpa")
    assert type(fast) is SDPAAttention and type(attn) is Attention
    return attn, fast


def run(attn, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    out = attn(x)
    (out.float() * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in attn.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


# (token grid H, W, rel-pos input_size): a 14x14-like window, a non-square grid whose tables are
# interpolated (global block at another image size), and an odd square window
GRIDS = [((4, 6), (4, 6)), ((5, 7), (4, 6)), ((3, 3), (3, 3))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("grid,input_size", GRIDS)
def test_sdpa_equals_segment_anything_attention(dtype, lora, grid, input_size):
    eager, fast = make_pair(input_size=input_size, lora=lora, dtype=dtype)
    torch.manual_seed(1)
    x = torch.randn(3, *grid, 48, dtype=dtype)  # batch 3: e.g. windows of one image
    upstream = torch.randn(3, *grid, 48, dtype=dtype)
    out_e, gx_e, g_e = run(eager, x, upstream)
    out_f, gx_f, g_f = run(fast, x, upstream)
    torch.testing.assert_close(out_f, out_e, **TOL[dtype])
    torch.testing.assert_close(gx_f, gx_e, **TOL[dtype])
    assert g_f.keys() == g_e.keys()
    expected = {"qkv.lora_A", "qkv.lora_B"} if lora else {"qkv.weight", "qkv.bias", "rel_pos_h", "rel_pos_w"}
    assert expected <= set(g_e)
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], **TOL[dtype], msg=name)


def test_only_the_relative_position_tables_train():
    """The mask alone needs a gradient (a case a CUDA kernel mishandles): still equal, forward and grads."""
    eager, fast = make_pair()
    for attn in (eager, fast):
        attn.qkv.requires_grad_(False)
        attn.proj.requires_grad_(False)
    x = torch.randn(2, 4, 6, 48)  # no gradient wanted for the input either
    grads = []
    for attn in (eager, fast):
        out = attn(x)
        out.square().sum().backward()
        grads.append((out.detach(), attn.rel_pos_h.grad, attn.rel_pos_w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float32])


def test_without_relative_positions():
    torch.manual_seed(0)
    eager = Attention(32, num_heads=4, use_rel_pos=False)
    fast = convert_attention(copy.deepcopy(eager), "sdpa")
    x = torch.randn(2, 3, 5, 32)
    torch.testing.assert_close(fast(x), eager(x), **TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 fused attention kernels need a CUDA device")
@pytest.mark.parametrize("grid,input_size", [((14, 14), (14, 14)), ((64, 64), (64, 64)), ((48, 40), (64, 64))])
def test_sdpa_bf16_on_cuda_matches_fp32_eager(grid, input_size):
    eager, fast = make_pair(dim=128, heads=2, input_size=input_size, lora=True, device="cuda")
    torch.manual_seed(1)
    x = torch.randn(2, *grid, 128, device="cuda")
    upstream = torch.randn(2, *grid, 128, device="cuda")
    out_e, gx_e, g_e = run(eager, x, upstream)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_f, gx_f, g_f = run(fast, x, upstream)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_f.float(), out_e, **tol)
    torch.testing.assert_close(gx_f.float(), gx_e, **tol)
    for name in g_e:  # gradients summed over many tokens: compare relative to their size
        scale = g_e[name].abs().max()
        torch.testing.assert_close(g_f[name].float() / scale, g_e[name] / scale, **tol, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_model_with_sdpa_equals_eager(method):
    """Whole model, every PEFT method (built on top of either attention), forward and gradients."""
    models = {}
    for impl in ("eager", "sdpa"):
        model = build_model(tiny_config(method, model={"attention": impl})).model.train()
        assert attention_impl(model.image_encoder) == impl
        models[impl] = model
    with torch.no_grad():  # make the adapters matter
        for p_e, p_f in zip(models["eager"].parameters(), models["sdpa"].parameters()):
            if p_e.requires_grad:
                p_e.add_(torch.randn_like(p_e) * 0.05)
                p_f.copy_(p_e)
    images = torch.randn(2, 3, 64, 80)
    results = {}
    for impl, model in models.items():
        torch.manual_seed(3)  # same gate noise
        out = model(images)
        (out.masks.square().mean() + out.aux_loss).backward()
        results[impl] = (out.masks.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None})
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], **TOL[torch.float32])
    assert results["sdpa"][1].keys() == results["eager"][1].keys()
    for name, g in results["eager"][1].items():
        torch.testing.assert_close(results["sdpa"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert list(models["sdpa"].state_dict()) == list(models["eager"].state_dict())


def test_attribute_names_are_kept_for_wrappers():
    model = build_model(tiny_config("lora")).model
    attn = model.image_encoder.blocks[0].attn
    assert isinstance(attn, EncoderAttention) and type(attn) is SDPAAttention
    for name in ("qkv", "proj", "num_heads", "scale", "use_rel_pos", "rel_pos_h", "rel_pos_w"):
        assert hasattr(attn, name), name
    assert type(attn.qkv) is LoRALinear  # the PEFT method wrapped qkv after the swap
    assert set_attention(model.image_encoder, "eager") == 2
    assert attention_impl(model.image_encoder) == "eager"


def test_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention: 'flash' is not one of sdpa, "):
        tiny_config("lora", model={"attention": "flash"})
    with pytest.raises(ConfigError, match="model.attention"):
        set_attention(torch.nn.Identity(), "flash")
    with pytest.raises(ConfigError, match="not SAM's image encoder"):
        set_attention(torch.nn.Identity(), "eager")


def test_registry_lists_every_implementation():
    assert attention_names()[0] == "sdpa" and {"sdpa", "eager"} <= set(attention_names())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_implementation_equals_segment_anything_op_for_op(impl, dtype):
    """Converting SAM's Attention keeps its function and its parameters (shared, same names)."""
    attn, _ = make_pair(dtype=dtype)
    conv = convert_attention(copy.deepcopy(attn), impl)
    x = torch.randn(2, 4, 6, 48, dtype=dtype)
    torch.testing.assert_close(conv(x), attn(x), **TOL[dtype])
    assert list(conv.state_dict()) == list(attn.state_dict())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_extra_keys_equal_a_longer_key_sequence(impl):
    """extra_kv (VPT's prompts) = attending over the concatenated keys with zero bias for the extras."""
    attn, _ = make_pair(dtype=torch.float64)
    conv = convert_attention(attn, impl)
    torch.manual_seed(4)
    x = torch.randn(2, 4, 6, 48, dtype=torch.float64)
    pk, pv = torch.randn(3, 48, dtype=torch.float64), torch.randn(3, 48, dtype=torch.float64)
    b, h, w, c = x.shape
    q, k, v = conv.split_qkv(x)
    from samft.model.attention.bias import rel_pos_bias

    bias = rel_pos_bias(q, conv.rel_pos_h, conv.rel_pos_w, (h, w), (h, w))
    kk = torch.cat([k, pk.reshape(3, 3, 16).transpose(0, 1).expand(b, -1, -1, -1)], 2)
    vv = torch.cat([v, pv.reshape(3, 3, 16).transpose(0, 1).expand(b, -1, -1, -1)], 2)
    logits = q @ kk.transpose(-2, -1) * conv.scale + torch.cat([bias, bias.new_zeros(b, 3, h * w, 3)], -1)
    expected = conv.proj((logits.softmax(-1) @ vv).transpose(1, 2).reshape(b, h, w, c))
    torch.testing.assert_close(conv(x, extra_kv=(pk, pv)), expected, rtol=1e-10, atol=1e-10)
