"""Method-specific checks beyond the registry-wide invariants of test_peft.py."""

import pytest
import torch

from segment_anything.modeling.image_encoder import Attention

from samft.model import build_model
from samft.peft.adapter import BottleneckAdapter
from samft.peft.sam_adapter import EVPBlock, EVPPromptGenerator, high_frequency
from samft.peft.ssf import SSFLayer
from samft.peft.vpt import VPTAttention

from conftest import tiny_config


def _build(method, attention="sdpa", **options):
    peft = {"method": method, method: options} if options else {"method": method}
    return build_model(tiny_config(method, peft=peft, model={"attention": attention})).model


def _randomise_rel_pos(attn, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.rel_pos_h.copy_(torch.randn(attn.rel_pos_h.shape, generator=g))
        attn.rel_pos_w.copy_(torch.randn(attn.rel_pos_w.shape, generator=g))


# ---------------------------------------------------------------------------------------------- VPT


IMPLS = ["eager", "sdpa"]  # model.attention: SAM's own attention or the fused one


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block, shape", [(0, (6, 2, 2, 32)), (1, (2, 4, 5, 32))])  # windowed, global
def test_vpt_attention_without_prompts_is_sams_attention(block, shape, impl):
    attn = _build("decoder_only", impl).image_encoder.blocks[block].attn
    _randomise_rel_pos(attn)
    x = torch.randn(shape)
    torch.testing.assert_close(attn(x, extra_kv=None), Attention.forward(attn, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_vpt_prompts_are_extra_keys_and_values(impl):
    """Without relative positions, attending with prompts = SAM's attention over [tokens; prompt tokens]."""
    model = _build("vpt", impl, num_tokens=3)
    blk = model.image_encoder.blocks[1]
    layer = blk.attn
    assert isinstance(layer, VPTAttention) and layer.prompts.shape == (3, 32)
    layer.base_layer.use_rel_pos = False
    x = torch.randn(2, 4, 5, 32)
    with torch.no_grad():
        got = layer(x)
        tokens = torch.cat([x.reshape(2, 20, 32), blk.norm1(layer.prompts).expand(2, -1, -1)], dim=1)
        want = Attention.forward(layer.base_layer, tokens.reshape(2, 1, 23, 32))[:, 0, :20].reshape(2, 4, 5, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block, shape", [(0, (6, 2, 2, 32)), (1, (2, 4, 5, 32))])
def test_vpt_fused_and_eager_attention_agree(block, shape):
    """With relative positions and prompts, the fused path (prompt keys: zero bias in the mask) equals
    the explicit one, forward and gradients."""
    layers = [_build("vpt", impl, num_tokens=3).image_encoder.blocks[block].attn for impl in IMPLS]
    for layer in layers:
        _randomise_rel_pos(layer.base_layer)
    with torch.no_grad():
        layers[1].prompts.copy_(layers[0].prompts)  # the same prompts (their init draws from the global RNG)
    x = torch.randn(shape)
    outs = [layer(x) for layer in layers]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), layer.prompts)[0] for out, layer in zip(outs, layers)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_vpt_every_window_attends_to_the_same_prompts(impl):
    """A windowed block: each window's result equals attending that window alone with the prompts."""
    model = _build("vpt", impl, num_tokens=2)
    layer = model.image_encoder.blocks[0].attn
    _randomise_rel_pos(layer.base_layer)
    windows = torch.randn(5, 2, 2, 32)
    with torch.no_grad():
        together = layer(windows)
        alone = torch.cat([layer(windows[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_vpt_prompts_of_windowed_and_global_blocks_learn():
    model = _build("vpt").train()
    out = model(torch.randn(2, 3, 64, 48))
    out.masks.square().mean().backward()
    for blk in model.image_encoder.blocks:
        assert blk.attn.prompts.grad is not None and blk.attn.prompts.grad.abs().sum() > 0
        assert blk.norm1.weight.grad is None and blk.attn.base_layer.qkv.weight.grad is None


# ---------------------------------------------------------------------------------------------- SAM-Adapter


def test_high_frequency_removes_the_low_frequencies_only():
    i, j = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    checker = ((-1.0) ** (i + j)).expand(1, 3, 16, 16)  # the highest frequency
    smooth = torch.cos(2 * torch.pi * i / 16).expand(1, 3, 16, 16) + 2.0  # DC + the lowest frequency
    torch.testing.assert_close(high_frequency(checker, 0.25), checker.abs(), rtol=0, atol=1e-5)
    torch.testing.assert_close(high_frequency(smooth, 0.25), torch.zeros_like(smooth), rtol=0, atol=1e-5)
    torch.testing.assert_close(high_frequency(checker + smooth, 0.25), checker.abs(), rtol=0, atol=1e-5)
    x = torch.randn(2, 3, 16, 32)
    torch.testing.assert_close(high_frequency(x, 0.0), x.abs(), rtol=0, atol=1e-5)  # nothing masked


@pytest.mark.parametrize("shared_up", [True, False])
def test_sam_adapter_layout(shared_up):
    model = _build("sam_adapter", scale_factor=8, shared_up=shared_up)
    enc = model.image_encoder
    gen = enc.patch_embed
    assert isinstance(gen, EVPPromptGenerator) and all(isinstance(b, EVPBlock) for b in enc.blocks)
    assert gen.embedding.out_features == 4 and gen.handcrafted.stride == (16, 16)
    ups = [n for n, _ in enc.named_parameters() if n.endswith("up.weight")]
    assert ups == (["patch_embed.up.weight"] if shared_up else ["blocks.0.up.weight", "blocks.1.up.weight"])
    assert not any(p.requires_grad for p in gen.base_layer.parameters())


def test_sam_adapter_prompts_reach_every_block_and_checkpointing_agrees():
    model = _build("sam_adapter", scale_factor=8).train()
    with torch.no_grad():
        for p in model.image_encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # away from the zero init, so every part gets a gradient
    images = torch.randn(2, 3, 48, 64)
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        model(images).masks.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.image_encoder.named_parameters() if p.requires_grad})
    assert set(grads[0]) == {"patch_embed.embedding.weight", "patch_embed.embedding.bias",
                             "patch_embed.handcrafted.weight", "patch_embed.handcrafted.bias",
                             "patch_embed.up.weight", "patch_embed.up.bias", "blocks.0.mlp.weight",
                             "blocks.0.mlp.bias", "blocks.1.mlp.weight", "blocks.1.mlp.bias"}
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_sam_adapter_block_without_its_feature_is_an_error():
    model = _build("sam_adapter")
    with pytest.raises(RuntimeError, match="without the prompt generator's feature"):
        model.image_encoder.blocks[0](torch.randn(1, 4, 4, 32))


# ---------------------------------------------------------------------------------------------- adapter, SSF


def test_adapter_positions():
    enc = _build("adapter", positions=["mlp"], bottleneck=5).image_encoder
    wrapped = [n for n, m in enc.named_modules() if isinstance(m, BottleneckAdapter)]
    assert wrapped == ["blocks.0.mlp", "blocks.1.mlp"]
    assert enc.blocks[0].mlp.down.out_features == 5 and not enc.blocks[0].mlp.up.weight.any()


def test_ssf_targets_and_init():
    enc = _build("ssf", targets=["lin2", "norm1"]).image_encoder
    wrapped = {n: m for n, m in enc.named_modules() if isinstance(m, SSFLayer)}
    assert sorted(wrapped) == ["blocks.0.mlp.lin2", "blocks.0.norm1", "blocks.1.mlp.lin2", "blocks.1.norm1"]
    for m in wrapped.values():
        assert torch.equal(m.scale, torch.ones(32)) and torch.equal(m.shift, torch.zeros(32))
