"""Bi-Level Routing Attention (``model.attention=bra``) against independent restatements.

- topk = regions**2 with LEPE off is SAM's dense attention (eager and sdpa): float64, 1e-10, forward and
  gradients, windowed and global blocks, square, non-square and grids the regions do not divide.
- topk < regions**2 equals a dense attention masked by the same routing indices (masked softmax).
- the routing equals a loop over regions (mean of the real tokens, affinity, top-k).
- the model around it: every PEFT method, checkpointing, bf16 autocast, save -> load, export, info, DDP.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos

from samft.config import BRAConfig
from samft.errors import CheckpointError, ConfigError
from samft.model import build_model, describe
from samft.model.attention import attention_kinds, convert_attention
from samft.model.attention.bra import BRAAttention, Regions

from conftest import METHODS, ROOT, TINY, perturb_trainable, sam_attention, tiny_config

F64 = dict(rtol=1e-10, atol=1e-10)


def make_attention(dim=48, heads=3, input_size=(5, 7), lora=True):
    """SAM's Attention in float64 with random rel-pos tables and (optionally) a trained-looking LoRA."""
    return sam_attention(dim, heads, input_size, lora, freeze="all").double()


def bra(attn, regions, topk, lepe_kernel=0, blocks="global"):
    return convert_attention(copy.deepcopy(attn), "bra", BRAConfig(regions, topk, lepe_kernel, blocks))


def run(module, x, upstream, **kw):
    x = x.detach().clone().requires_grad_(True)
    out = module(x, **kw)
    (out * upstream).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def assert_same(got, want, tol=F64):
    out_g, gx_g, g_g = got
    out_w, gx_w, g_w = want
    torch.testing.assert_close(out_g, out_w, **tol)
    torch.testing.assert_close(gx_g, gx_w, **tol)
    assert set(g_w) <= set(g_g) and g_w
    for name in g_w:
        torch.testing.assert_close(g_g[name], g_w[name], **tol, msg=name)


# (batch, token grid, rel-pos input_size, regions): a global map with tables interpolated; a non-square
# map the regions divide; windows (many in a batch) of 4x4 and of SAM's 14x14 that 8 regions do not divide;
# a map smaller than the regions (regions of padding only)
CASES = [(2, (8, 8), (8, 8), 4), (1, (6, 9), (4, 6), 3), (6, (4, 4), (4, 4), 2), (3, (14, 14), (14, 14), 8),
         (2, (5, 7), (5, 7), 3), (1, (3, 5), (3, 5), 4)]


@pytest.mark.parametrize("lora", [True, False])  # gradients for a LoRA on qkv / for every SAM parameter
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("batch,grid,input_size,regions", CASES)
def test_all_regions_is_dense_attention(impl, batch, grid, input_size, regions, lora):
    sam = make_attention(input_size=input_size, lora=lora)
    dense = convert_attention(copy.deepcopy(sam), impl) if impl == "sdpa" else sam
    sparse = bra(sam, regions, regions ** 2)
    torch.manual_seed(1)
    x = torch.randn(batch, *grid, 48, dtype=torch.float64)
    upstream = torch.randn(batch, *grid, 48, dtype=torch.float64)
    assert_same(run(sparse, x, upstream), run(dense, x, upstream))


def test_all_regions_is_dense_attention_without_rel_pos():
    torch.manual_seed(0)
    sam = Attention(32, num_heads=4, use_rel_pos=False).double()
    x, up = torch.randn(2, 5, 6, 32, dtype=torch.float64), torch.randn(2, 5, 6, 32, dtype=torch.float64)
    assert_same(run(bra(sam, 2, 4), x, up), run(sam, x, up))


def masked_dense(module: BRAAttention, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Dense attention (segment_anything's rel-pos bias) where token q may attend to token k only if k's
    region is one of the routed regions of q's region (indices into each image's own regions)."""
    b, h, w, c = x.shape
    heads = module.num_heads
    g = Regions.of(h, w, module.regions)
    q, k, v = (t.reshape(b * heads, h * w, -1) for t in module.split_qkv(x))
    logits = add_decomposed_rel_pos((q * module.scale) @ k.transpose(-2, -1), q, module.rel_pos_h,
                                    module.rel_pos_w, (h, w), (h, w))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region = ((rows // g.rh) * g.s + cols // g.rw).reshape(-1)  # each token's region
    allowed = torch.zeros(b, g.count, g.count, dtype=torch.bool).scatter_(2, idx, True)
    mask = allowed[:, region][:, :, region].repeat_interleave(heads, 0)  # (B*heads, N, N)
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return module.proj((weights @ v).view(b, heads, h * w, -1).transpose(1, 2).reshape(b, h, w, c))


@pytest.mark.parametrize("batch,grid,input_size,regions", CASES)
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_fewer_regions_is_masked_dense_attention(batch, grid, input_size, regions, fraction):
    sam = make_attention(input_size=input_size)
    sparse = bra(sam, regions, max(1, int(regions ** 2 * fraction)))
    torch.manual_seed(2)
    x = torch.randn(batch, *grid, 48, dtype=torch.float64)
    upstream = torch.randn(batch, *grid, 48, dtype=torch.float64)
    idx = sparse.prepare(x)[0].idx  # the routing of this input (no gradient flows through it)
    reference = copy.deepcopy(sparse)
    reference.forward = lambda t: masked_dense(reference, t, idx)
    assert_same(run(sparse, x, upstream), run(reference, x, upstream))
    assert idx.shape == (batch, regions ** 2, sparse.topk)


def loop_routing(module: BRAAttention, x: torch.Tensor) -> list[list[set[int]]]:
    """Per image and region (row-major), the set of top-k key regions, one region at a time."""
    b, h, w, c = x.shape
    g = Regions.of(h, w, module.regions)
    q, k, _ = module.qkv(x).detach().chunk(3, dim=-1)  # (B, H, W, C): all heads' channels
    result = []
    for i in range(b):
        means_q, means_k, empty = [], [], []
        for ry in range(g.s):
            for rx in range(g.s):
                ys, xs = slice(ry * g.rh, min((ry + 1) * g.rh, h)), slice(rx * g.rw, min((rx + 1) * g.rw, w))
                block_q, block_k = q[i, ys, xs].reshape(-1, c), k[i, ys, xs].reshape(-1, c)
                empty.append(block_q.shape[0] == 0)
                means_q.append(block_q.mean(0) if block_q.shape[0] else torch.zeros(c, dtype=x.dtype))
                means_k.append(block_k.mean(0) if block_k.shape[0] else torch.zeros(c, dtype=x.dtype))
        sets = []
        for r in range(g.count):
            scores = [float("-inf") if empty[j] else float(means_q[r] @ means_k[j]) for j in range(g.count)]
            ranked = sorted(range(g.count), key=lambda j: -scores[j])
            sets.append(set(ranked[: module.topk]))
        result.append(sets)
    return result


@pytest.mark.parametrize("batch,grid,input_size,regions", CASES)
def test_routing_equals_a_loop_over_regions(batch, grid, input_size, regions):
    sam = make_attention(input_size=input_size)
    sparse = bra(sam, regions, max(1, regions ** 2 // 3))
    torch.manual_seed(3)
    x = torch.randn(batch, *grid, 48, dtype=torch.float64)
    idx = sparse.prepare(x)[0].idx
    got = [[set(row.tolist()) for row in image] for image in idx]
    want = loop_routing(sparse, x)
    g = Regions.of(*grid, regions)
    real = [j for j in range(g.count) if g.valid(x.device)[j].any()]
    for image_got, image_want in zip(got, want):
        for r, (s_got, s_want) in enumerate(zip(image_got, image_want)):
            if r not in real:  # a query region of padding only: no output, any routing
                continue
            if len(real) >= sparse.topk:  # ties among padding-only regions are in any order
                assert s_got == s_want, (r, s_got, s_want)
            else:
                assert set(real) <= s_got


def test_routing_is_detached_and_shared_by_heads():
    sparse = bra(make_attention(), 3, 2)
    x = torch.randn(2, 5, 7, 48, dtype=torch.float64, requires_grad=True)
    r, _ = sparse.prepare(x)
    assert r.idx.shape == (2, 9, 2) and not r.idx.requires_grad  # (B, S^2, topk): no head axis


def test_lepe_is_a_zero_initialised_depthwise_conv_on_v():
    sam = make_attention(lora=False)
    with_lepe, without = bra(sam, 2, 4, lepe_kernel=3), bra(sam, 2, 4)
    assert with_lepe.lepe.weight.shape == (48, 1, 3, 3) and with_lepe.lepe.groups == 48
    assert not with_lepe.lepe.weight.any() and without.lepe is None
    x = torch.randn(2, 5, 7, 48, dtype=torch.float64)
    torch.testing.assert_close(with_lepe(x), without(x), **F64)  # zero-initialised: the sparse SAM
    with torch.no_grad():
        with_lepe.lepe.weight.normal_()
        with_lepe.lepe.bias.normal_()
        v = with_lepe.qkv(x)[..., 96:].permute(0, 3, 1, 2)
        expected = torch.nn.functional.conv2d(v, with_lepe.lepe.weight, with_lepe.lepe.bias, padding=1, groups=48)
        # proj is linear: proj(a + l) = proj(a) + W l
        want = without(x) + expected.permute(0, 2, 3, 1) @ without.proj.weight.T
    torch.testing.assert_close(with_lepe(x), want, **F64)


def test_extra_keys_are_appended_to_every_querys_keys_with_zero_bias():
    """VPT's prompts: with all regions, BRA + extra keys = eager attention + the same extra keys."""
    sam = make_attention()
    sparse = bra(sam, 3, 9)
    eager = convert_attention(copy.deepcopy(sam), "eager")
    torch.manual_seed(4)
    x, up = torch.randn(2, 5, 7, 48, dtype=torch.float64), torch.randn(2, 5, 7, 48, dtype=torch.float64)
    extra = (torch.randn(3, 48, dtype=torch.float64), torch.randn(3, 48, dtype=torch.float64))
    assert_same(run(sparse, x, up, extra_kv=extra), run(eager, x, up, extra_kv=extra))
    # and with fewer regions: the prompts take part of every query's softmax (they change each output)
    few = bra(sam, 3, 2)
    with torch.no_grad():
        assert not torch.allclose(few(x, extra_kv=extra), few(x))


def test_options_are_checked():
    with pytest.raises(ConfigError, match="model.bra.topk: 20 exceeds regions\\*\\*2 = 16"):
        tiny_config("lora", model={"attention": "bra", "bra": {"regions": 4, "topk": 20}})
    with pytest.raises(ConfigError, match="model.bra.lepe_kernel: 4 is even"):
        tiny_config("lora", model={"attention": "bra", "bra": {"lepe_kernel": 4}})
    with pytest.raises(ConfigError, match="model.bra.blocks: 'windowed' is not one of global, all"):
        tiny_config("lora", model={"attention": "bra", "bra": {"blocks": "windowed"}})


# ------------------------------------------------------------------------------------- FlexAttention


@pytest.mark.parametrize("grid,regions,topk", [((8, 8), 4, 5), ((5, 7), 3, 4), ((3, 5), 4, 16)])
def test_flex_attention_block_mask_and_score_mod_equal_the_torch_path(grid, regions, topk):
    """FlexAttention's reference implementation (CPU, forward only: it has no CPU backward) with the
    same BlockMask and score_mod the CUDA kernel gets; the block mask's blocks are the routing."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from samft.model.attention._bra_flex import block_mask

    sparse = bra(make_attention(), regions, topk)
    x = torch.randn(2, *grid, 48, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile")  # the reference, deliberately
        want = sparse(x)
        sparse.use_flex = True
        got = sparse(x)
    torch.testing.assert_close(got, want, **F64)
    r, _ = sparse.prepare(x)
    dense = block_mask(r).to_dense()[:, 0].bool()  # (B, S^2, S^2): the blocks the kernel visits
    allowed = torch.zeros_like(dense).scatter_(2, r.idx, True)
    assert torch.equal(dense, allowed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention kernel (Triton) needs a CUDA device")
@pytest.mark.parametrize("grid,regions,topk", [((64, 64), 8, 16), ((48, 40), 8, 16), ((14, 14), 8, 16)])
def test_flex_attention_on_cuda_equals_the_torch_path(grid, regions, topk):
    sparse = bra(make_attention(dim=128, heads=2, input_size=grid), regions, topk).float().cuda()
    torch.manual_seed(5)
    x = torch.randn(2, *grid, 128, device="cuda")
    up = torch.randn(2, *grid, 128, device="cuda")
    sparse.use_flex = False
    want = run(sparse, x, up)
    sparse.use_flex = True
    got = run(sparse, x, up)
    assert_same(got, want, dict(rtol=2e-4, atol=2e-4))


# ------------------------------------------------------------------------------------- in the model


BRA = {"attention": "bra", "bra": {"regions": 2, "topk": 2, "lepe_kernel": 3}}


def test_blocks_option_chooses_the_blocks():
    model = build_model(tiny_config("lora", model=BRA)).model
    assert attention_kinds(model.image_encoder) == ["sdpa", "bra"]  # block 1 is the global one
    model = build_model(tiny_config("lora", model={**BRA, "bra": {**BRA["bra"], "blocks": "all"}})).model
    assert attention_kinds(model.image_encoder) == ["bra", "bra"]


def test_no_block_to_replace_is_a_warning():
    with pytest.warns(UserWarning, match="model.attention=bra applies to no encoder block"):
        build_model(tiny_config("lora", model={**BRA, "tiny": {**TINY["tiny"], "global_attn_indexes": []}}))


def test_whole_model_with_all_regions_is_the_dense_model():
    """Every block BRA (windows included), topk = all regions, LEPE off: SAM's encoder (with trained-looking
    LoRA layers), float64, output and gradients."""
    options = {"attention": "bra", "bra": {"regions": 2, "topk": 4, "lepe_kernel": 0, "blocks": "all"}}
    models = [build_model(tiny_config("lora", model=m)).model.double().train() for m in ({"attention": "eager"},
                                                                                        options)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p_dense, p_bra in zip(*(m.parameters() for m in models)):
            if p_dense.requires_grad:
                p_dense.add_(torch.randn(p_dense.shape, generator=g, dtype=p_dense.dtype) * 0.05)
                p_bra.copy_(p_dense)
    images = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    results = []
    for model in models:  # the encoder (the decoder is the same module in both, and not float64-ready)
        out = model.encode(images)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], **F64)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **F64, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_every_peft_method_trains_a_step_with_bra(method):
    from samft.engine.artifacts.adapter import trainable_state

    model = build_model(tiny_config(method, model=BRA)).model.train()
    (lepe,) = [n for n, _ in model.named_parameters() if n.endswith("lepe.weight")]  # one global block
    assert lepe.startswith("image_encoder.blocks.1.")  # (under a method's base_layer wrapper for some)
    assert lepe in trainable_state(model), "LEPE must train and be saved with the adapter"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.randn(2, 3, 64, 80))
    (out.masks.sigmoid().mean() + out.aux_loss).backward()
    params = dict(model.named_parameters())
    assert params[lepe].grad is not None and params[lepe].grad.abs().sum() > 0
    opt.step()
    assert params[lepe].abs().sum() > 0, "LEPE left its zero initialisation"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def test_checkpointing_equals_no_checkpointing():
    model = build_model(tiny_config("conv_lora", model=BRA)).model.train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    images = torch.randn(2, 3, 64, 80)
    results = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(7)  # Conv-LoRA's gate noise
        out = model(images)
        (out.masks.square().mean() + out.aux_loss).backward()
        results.append((out.masks.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    model = build_model(tiny_config("lora", model=BRA)).model.train()
    images = torch.randn(2, 3, 64, 80)
    want = model(images).masks.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    out.masks.float().square().mean().backward()
    assert out.masks.dtype == torch.bfloat16
    grad = model.image_encoder.blocks[1].attn.lepe.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    torch.testing.assert_close(out.masks.float(), want, rtol=0.1, atol=0.1)


def test_save_load_and_the_attention_is_recorded(tmp_path):
    from samft.engine.artifacts.adapter import load_adapter, read_adapter, save_adapter, adapter_expectations

    cfg = tiny_config("lora", model=BRA)
    built = build_model(cfg)
    model = perturb_trainable(built.model).eval()
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path, adapter_expectations(cfg, built.base_sha256, built.model))
    tensors, meta = read_adapter(path)
    assert meta["attention"] == "bra" and "image_encoder.blocks.1.attn.lepe.weight" in tensors
    fresh = build_model(cfg)
    load_adapter(fresh.model, path, adapter_expectations(cfg, fresh.base_sha256, fresh.model))
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.eval()(images).masks, model(images).masks, rtol=0, atol=0)
    # a BRA adapter onto a dense model (even with LEPE off, where the tensors would fit) and the reverse
    no_lepe = tiny_config("lora", model={**BRA, "bra": {**BRA["bra"], "lepe_kernel": 0}})
    built = build_model(no_lepe)
    save_adapter(built.model, path, adapter_expectations(no_lepe, built.base_sha256, built.model))
    dense_cfg = tiny_config("lora")
    dense = build_model(dense_cfg)
    with pytest.raises(CheckpointError, match="encoder attention \\(model.attention\\) 'bra', but this model has "
                                              "'sdpa'"):
        load_adapter(dense.model, path, adapter_expectations(dense_cfg, dense.base_sha256, dense.model))
    save_adapter(dense.model, path, adapter_expectations(dense_cfg, dense.base_sha256, dense.model))
    with pytest.raises(CheckpointError, match="'sdpa', but this model has 'bra'"):
        load_adapter(built.model, path, adapter_expectations(no_lepe, built.base_sha256, built.model))
    eager_cfg = tiny_config("lora", model={"attention": "eager"})  # the same function as sdpa: loads
    eager = build_model(eager_cfg)
    load_adapter(eager.model, path, adapter_expectations(eager_cfg, eager.base_sha256, eager.model))


@pytest.mark.parametrize("method", ["lora", "conv_lora"])  # mergeable and not: both export unmerged with BRA
def test_export_is_unmerged_and_gives_the_runs_outputs(method, tmp_path):
    from samft.config import dump_yaml
    from samft.engine.artifacts.adapter import save_adapter, adapter_expectations
    from samft.engine.artifacts.export import export_run, load_exported
    from samft.engine.artifacts.rundir import ADAPTER_FILE, CONFIG_FILE

    cfg = tiny_config(method, model=BRA)
    built = build_model(cfg)
    model = perturb_trainable(built.model).eval()
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text(dump_yaml(cfg))
    save_adapter(model, run / ADAPTER_FILE, adapter_expectations(cfg, built.base_sha256, built.model))
    result = export_run(run, tmp_path / "model.pth")
    assert not result.merged
    if method == "lora":
        assert result.message().startswith("model.attention=bra is not SAM's attention")
    exported = load_exported(tmp_path / "model.pth")
    assert attention_kinds(exported.image_encoder) == ["sdpa", "bra"]
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(exported(images).masks, model(images).masks, rtol=1e-6, atol=1e-6)


def test_info_shows_the_attention_its_options_lepe_and_gmacs(tmp_path):
    from typer.testing import CliRunner

    from samft.cli import app

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY, **BRA}, "peft": {"method": "lora"}}))
    runner = CliRunner()
    result = runner.invoke(app, ["info", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("attention bra {'regions': 2, 'topk': 2, 'lepe_kernel': 3, 'blocks': 'global'} "
            "(blocks: sdpa x 1, bra x 1)") in text
    assert "attn params 320 new, trainable (lepe.weight 288, lepe.bias 32)" in text
    result = runner.invoke(app, ["info", "--config", str(config), "--json"])
    info = json.loads(result.output)
    assert info["attention"] == "bra" and info["attention_options"]["topk"] == 2
    assert info["attention_params"] == {"lepe.weight": 32 * 9, "lepe.bias": 32}
    dense = describe(tiny_config("lora"))
    assert dense["attention"] == "sdpa" and dense["attention_options"] == {} and dense["attention_params"] == {}
    assert 0 < info["encoder_gmacs"] and dense["encoder_gmacs"] > 0


def test_encoder_gmacs_at_2048_px():
    """ViT-B at 2048 px: the four dense global blocks cost ~1.8 TMACs of attention; BRA (S=16, topk=16)
    keeps 1024 keys per query."""
    from samft.prune.encoder_flops import encoder_flops

    gmacs = {}
    for attention in ("sdpa", "bra"):
        cfg = tiny_config("lora", model={"type": "vit_b", "img_size": 2048, "attention": attention,
                                         "bra": {"regions": 16, "topk": 16}})
        gmacs[attention] = encoder_flops(build_model(cfg, meta=True).model.image_encoder, 2048)
        assert describe(cfg)["encoder_gmacs"] == round(gmacs[attention]["total"] / 2e9, 3)
    dense, sparse = gmacs["sdpa"], gmacs["bra"]
    tokens, dim, blocks = 128 * 128, 768, 4
    # only the global blocks differ: each query sees 1024 keys (16 regions of 8 x 8) instead of 16384
    assert dense["attention"] - sparse["attention"] == blocks * 2 * 2 * tokens * (tokens - 1024) * dim
    assert blocks * 2 * tokens * tokens * dim / 1e12 == pytest.approx(1.65, rel=0.01)  # the issue's ~1.8 TMACs
    assert sparse["routing"] == blocks * 2 * 256 * 256 * dim and sparse["lepe"] == blocks * 2 * tokens * dim * 25
    assert dense["routing"] == dense["lepe"] == 0


DDP_SCRIPT = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS"])
from conftest import tiny_config
from samft.model import build_model
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = build_model(tiny_config("lora", model={"attention": "bra", "bra": {"regions": 2, "topk": 2,
                                                                          "lepe_kernel": 3}})).model.train()
images = torch.randn(4, 3, 64, 80, generator=torch.Generator().manual_seed(1))
reference = {}
out = model(images)
out.masks.square().mean().backward()
reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
model.zero_grad()
ddp = torch.nn.parallel.DistributedDataParallel(model)
ddp(images[2 * rank: 2 * rank + 2]).masks.square().mean().backward()
for name, p in model.named_parameters():
    if p.requires_grad:
        others = [torch.zeros_like(p.grad) for _ in range(2)]
        dist.all_gather(others, p.grad)
        assert torch.equal(others[0], others[1]), name
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-6, msg=name)
assert reference["image_encoder.blocks.1.attn.lepe.weight"].abs().sum() > 0
print(f"rank {rank}: identical gradients, equal to the single-process batch")
dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early can abort the other)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo/DDP threads joined by C++ destructors there sometimes abort (SIGABRT)
'''


def test_ddp_on_gloo_gives_identical_gradients_equal_to_one_process(tmp_path):
    script = tmp_path / "ddp_bra.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TESTS": str(ROOT / "tests"),
           "SAMFT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rank 0: identical gradients" in out and "rank 1: identical gradients" in out


def test_info_names_bra_inside_vpts_wrapper():
    """VPT wraps the whole attention (``base_layer``): ``samft info`` still names the attention inside it."""
    from samft.config import config_from_dict
    from samft.model import describe

    cfg = config_from_dict({"model": {"type": "tiny", "img_size": 64, "attention": "bra",
                                      "bra": {"regions": 2, "topk": 2, "blocks": "all"}}, "peft": {"method": "vpt"}})
    assert describe(cfg)["attention_blocks"] == {"bra": 2}
