"""SPViT pruning: derived convolutions, gates, rebuilt blocks, FLOPs, architecture descriptions, search."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from samft.model import build_model
from samft.prune.encoder_flops import encoder_flops
from samft.prune.derived import derive_conv, effective_linear, head_mixing, value_and_proj
from samft.prune.errors import PruneError
from samft.prune.flops import encoder_block_flops, gmacs, search_flops
from samft.prune.gates import mixer_weights, nested
from samft.prune.rebuild import (PrunedBlock, build_pruned_encoder, format_ranges, parse_ranges, pruned_mlp,
                                 rebuild)
from samft.prune.order import ATTN, MLP, check_reachable, meet_target, pruning_order
from samft.prune.search import search, to_search
from samft.prune.search_block import SearchBlock, out_features

from conftest import tiny_config

ON, OFF = 4.0, -4.0  # thresholds: sigmoid(4) > 0.5 (gate on), sigmoid(-4) < 0.5 (off)
STATES = {"msa": (ON, ON, ON), "conv3": (ON, ON, OFF), "conv1": (ON, OFF, OFF), "skip": (OFF, OFF, OFF)}


def _model(method="decoder_only", seed=0, **peft):
    torch.manual_seed(seed)
    sections = {"model": {"attention": "eager"}}
    if peft:
        sections["peft"] = {"method": method, method: peft}
    model = build_model(tiny_config(method, **sections)).model
    with torch.no_grad():  # make the zero-initialised parts count: rel-pos tables, LoRA's B
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name or "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def _set_state(block: SearchBlock, choice: str, units: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        block.attn_thresholds.copy_(torch.tensor(STATES[choice]))
        if units is not None:
            block.mlp_thresholds.copy_(torch.where(units, ON, OFF))


def _trained_bn(block: SearchBlock, y: torch.Tensor) -> None:
    """Give the BatchNorms non-trivial running statistics and affine parameters."""
    block.train()
    with torch.no_grad():
        for bn in (block.bn3, block.bn1):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        for _ in range(3):
            block.conv(y, 3), block.conv(y, 1)
    block.eval()


def _shifted_sum(x, v_w, v_b, proj_w, mixing, kernel):
    """The bottleneck pre-activation as an explicit sum over kernel positions of shifted inputs times the
    head-weighted value projections: x (B, H, W, C) -> (B, H, W, d); also the expansion (C, d)."""
    heads = mixing.shape[0]
    d = v_w.shape[0] // heads
    b, h, w, _ = x.shape
    r = kernel // 2
    padded = F.pad(x, (0, 0, r, r, r, r))
    out = torch.zeros(b, h, w, d, dtype=x.dtype)
    bias = torch.zeros(d, dtype=x.dtype)
    expand = torch.zeros(proj_w.shape[0], d, dtype=x.dtype)
    for ky in range(kernel):
        for kx in range(kernel):
            p = 4 if kernel == 1 else 3 * ky + kx
            shifted = padded[:, ky:ky + h, kx:kx + w]
            for head in range(heads):
                rows = slice(head * d, (head + 1) * d)
                out += mixing[head, p] * shifted @ v_w[rows].T
                bias += mixing[head, p] * v_b[rows]
                expand += mixing[head, p] * proj_w[:, rows]
    return out + bias, expand


def _reference_conv(block: SearchBlock, y: torch.Tensor, kernel: int) -> torch.Tensor:
    v_w, v_b, o_w, o_b = value_and_proj(block.attn)
    pre, expand = _shifted_sum(y, v_w, v_b, o_w, head_mixing(block.head_probs, block.alpha), kernel)
    bn = block.bn3 if kernel == 3 else block.bn1
    act = torch.relu(bn(pre.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
    return act @ expand.T + o_b


# -- derived convolution -------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [3, 1])
def test_derived_conv_is_the_shifted_sum_of_head_weighted_values(kernel):
    torch.manual_seed(0)
    heads, d, dim = 3, 4, 12
    v_w, v_b, proj_w = torch.randn(dim, dim), torch.randn(dim), torch.randn(dim, dim)
    mixing = head_mixing(torch.randn(heads, 9), alpha=0.5)
    x = torch.randn(2, 5, 6, dim)
    weight, bias, expand = derive_conv(v_w, v_b, proj_w, mixing, kernel)
    got = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=kernel // 2).permute(0, 2, 3, 1)
    want, want_expand = _shifted_sum(x, v_w, v_b, proj_w, mixing, kernel)
    assert weight.shape == (d, dim, kernel, kernel)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expand, want_expand, rtol=1e-5, atol=1e-5)


def test_head_mixing_is_a_softmax_over_heads_and_starts_uniform():
    assert torch.allclose(head_mixing(torch.ones(4, 9), 1e-2), torch.full((4, 9), 0.25))
    assert torch.allclose(head_mixing(torch.randn(4, 9), 1e-2).sum(0), torch.ones(9))


def test_effective_weight_includes_the_lora_delta():
    model = _model("lora", targets=["qkv"], rank=2)
    qkv = model.image_encoder.blocks[0].attn.qkv
    assert hasattr(qkv, "lora_A")
    w, b = effective_linear(qkv)
    x = torch.randn(3, 32)
    torch.testing.assert_close(F.linear(x, w, b), qkv(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(w, qkv.base_layer.weight)


# -- gates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,peft", [("decoder_only", {}), ("lora", {"targets": ["qkv"], "rank": 2})])
@pytest.mark.parametrize("index", [0, 1])  # windowed, global
@pytest.mark.parametrize("choice", ["msa", "conv3", "conv1", "skip"])
def test_each_hard_gate_state_gives_exactly_its_branch(method, peft, index, choice):
    model = _model(method, **peft)
    sam_block = model.image_encoder.blocks[index]
    block = SearchBlock(copy.deepcopy(sam_block)).eval()
    x = torch.randn(2, 5, 3, 32)  # 5 x 3 tokens: windows of 2 need padding
    y = block.norm1(x)
    _trained_bn(block, y)
    with torch.no_grad():
        block.head_probs.normal_(0, 0.02)
    _set_state(block, choice, torch.ones(block.hidden, dtype=torch.bool))
    with torch.no_grad():
        if choice == "msa":
            want = sam_block(x)
        else:
            mixed = {"conv3": lambda: _reference_conv(block, y, 3), "conv1": lambda: _reference_conv(block, y, 1),
                     "skip": lambda: 0}[choice]()
            h = x + mixed
            want = h + sam_block.mlp(sam_block.norm2(h))
        torch.testing.assert_close(block(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 1])
def test_all_gates_off_gives_the_residual_only(index):
    block = SearchBlock(_model().image_encoder.blocks[index]).eval()
    _set_state(block, "skip", torch.zeros(block.hidden, dtype=torch.bool))
    x = torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        assert torch.equal(block(x), x)


def test_gates_are_sampled_in_training_and_carry_gradients():
    block = SearchBlock(_model().image_encoder.blocks[1]).train()
    with torch.no_grad():
        block.mlp_thresholds.zero_()  # p = 0.5: samples differ
    samples = torch.stack([block.mlp_gates().detach() for _ in range(4)])
    assert set(samples.unique().tolist()) == {0.0, 1.0} and not torch.equal(samples[0], samples[1])
    block(torch.randn(2, 4, 4, 32)).square().sum().backward()
    assert block.attn_thresholds.grad is not None and block.mlp_thresholds.grad.abs().sum() > 0
    assert block.head_probs.grad is not None


def test_nested_indicators_slow_down_the_less_complex_gates():
    gates = torch.ones(3, requires_grad=True)
    ind = nested(gates)
    assert ind.tolist() == [1.0, 1.0, 1.0]
    ind[0].backward()
    assert gates.grad[0] == 0  # i1's task gradient stopped while i2 is on
    gates = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    ind = nested(gates)
    assert ind.tolist() == [1.0, 0.0, 0.0]
    ind[0].backward()
    assert gates.grad[0] == 1  # 3x3 off: the 1x1 gate trains


def test_mixer_weights_with_soft_indicators():
    msa, conv3, conv1 = mixer_weights(torch.tensor([0.9, 0.5, 0.2]))
    assert msa.item() == pytest.approx(0.2)
    assert conv3.item() == pytest.approx(0.5 * 0.8)
    assert conv1.item() == pytest.approx(0.9 * 0.5 * 0.8)


def test_conv_lora_blocks_convert_with_their_linear_part_and_say_so():
    block = SearchBlock(_model("conv_lora", targets=["qkv"], rank=2).image_encoder.blocks[1]).eval()
    qkv = block.attn.qkv
    w, b = effective_linear(qkv)
    torch.testing.assert_close(w, qkv.base_layer.weight + qkv.lora_B @ qkv.lora_A * qkv.scaling)
    _set_state(block, "conv3", torch.ones(block.hidden, dtype=torch.bool))
    encoder = torch.nn.Module()
    encoder.blocks = torch.nn.ModuleList([block])
    x = torch.randn(1, 4, 4, 32)
    with torch.no_grad():
        want = block(x)
    with pytest.warns(UserWarning, match="experts are dropped"):
        rebuild(encoder)
    with torch.no_grad():
        torch.testing.assert_close(encoder.blocks[0](x), want, rtol=1e-5, atol=1e-5)


# -- MLP and rebuilt blocks ----------------------------------------------------------------------
@pytest.mark.parametrize("method,peft", [("decoder_only", {}), ("lora", {"targets": ["lin1", "lin2"], "rank": 2})])
@pytest.mark.parametrize("keep", ["random", "none", "all"])
def test_masked_mlp_equals_physically_pruned_mlp(method, peft, keep):
    block = SearchBlock(_model(method, **peft).image_encoder.blocks[0]).eval()
    units = {"random": torch.rand(block.hidden) < 0.4, "none": torch.zeros(block.hidden, dtype=torch.bool),
             "all": torch.ones(block.hidden, dtype=torch.bool)}[keep]
    _set_state(block, "skip", units)
    y = torch.randn(2, 4, 4, 32)
    pruned = pruned_mlp(block.mlp, block.kept_units())
    with torch.no_grad():
        masked = block.gated_mlp(y, block.mlp_gates())
        if keep == "none":
            assert pruned is None and torch.equal(masked, torch.zeros_like(y))
        else:
            assert out_features(pruned.lin1) == int(units.sum())
            assert isinstance(pruned.lin1, nn.Linear) == (method == "decoder_only")  # LoRA stays a LoRA
            torch.testing.assert_close(pruned(y), masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,peft", [("decoder_only", {}), ("lora", {"targets": ["qkv", "lin1"], "rank": 2})])
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("choice", ["msa", "conv3", "conv1", "skip"])
def test_pruned_block_equals_gated_block(method, peft, index, choice):
    torch.manual_seed(index)
    block = SearchBlock(_model(method, **peft).image_encoder.blocks[index]).eval()
    x = torch.randn(2, 5, 3, 32)
    _trained_bn(block, block.norm1(x))
    with torch.no_grad():
        block.head_probs.normal_(0, 0.02)
    _set_state(block, choice, torch.rand(block.hidden) < 0.5)
    encoder = torch.nn.Module()
    encoder.blocks = torch.nn.ModuleList([block])
    arch = rebuild(encoder)
    pruned = encoder.blocks[0].eval()
    assert isinstance(pruned, PrunedBlock) and arch["blocks"][0]["attn"] == choice
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), block(x), rtol=1e-5, atol=1e-5)
    names = [n for n, _ in pruned.named_parameters()]
    assert (choice == "msa") == any("rel_pos" in n for n in names)  # converted blocks drop rel_pos
    assert not any("thresholds" in n or "head_probs" in n for n in names)


# -- FLOPs ---------------------------------------------------------------------------------------
def _counted(model, images):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(images)
    return counter.get_total_flops()


def _searched(choices, seed=0, method="decoder_only", **peft):
    model = _model(method, seed, **peft)
    to_search(model.image_encoder)
    gen = torch.Generator().manual_seed(seed)
    for blk, choice in zip(model.image_encoder.blocks, choices):
        _set_state(blk, choice, torch.rand(blk.hidden, generator=gen) < 0.6)
    return model


def test_dense_formula_equals_the_model_formula():
    enc = _model().image_encoder
    for hw in [(64, 64), (80, 48)]:
        assert encoder_block_flops(enc, *hw)["total"] == encoder_flops(enc, *hw)["total"]


@pytest.mark.parametrize("hw", [(64, 64), (80, 48)])
@pytest.mark.parametrize("choices", [("msa", "msa"), ("conv3", "msa"), ("msa", "conv1"), ("conv1", "skip"),
                                     ("skip", "conv3")])
def test_pruned_encoder_flops_equal_the_flop_counter(hw, choices):
    model = _searched(choices)
    enc = model.image_encoder
    structural = encoder_block_flops(enc, *hw)["total"]
    assert float(search_flops(enc, *hw).detach()) == structural
    rebuild(enc)
    assert encoder_block_flops(enc, *hw)["total"] == structural
    assert _counted(model, torch.randn(1, 3, *hw)) == structural


def test_search_flops_have_gradients_for_every_threshold():
    enc = _searched(("msa", "conv3")).image_encoder
    search_flops(enc, 64).backward()
    for blk in enc.blocks:
        assert blk.attn_thresholds.grad.abs().sum() > 0 and (blk.mlp_thresholds.grad > 0).all()


# -- architecture description --------------------------------------------------------------------
def test_ranges_round_trip():
    idx = [0, 1, 2, 5, 7, 8, 127]
    assert format_ranges(idx) == "0-2,5,7-8,127"
    assert parse_ranges(format_ranges(idx), 128, "x") == idx
    assert parse_ranges("", 128, "x") == []
    for bad in ["0-128", "a", "3,3"]:
        with pytest.raises(PruneError):
            parse_ranges(bad, 128, "x")


@pytest.mark.parametrize("choices", [("conv3", "msa"), ("skip", "conv1")])
def test_build_pruned_encoder_from_description_loads_the_pruned_state(choices):
    dense = _model("lora", seed=3, targets=["qkv"], rank=2)
    fresh = copy.deepcopy(dense)
    model = copy.deepcopy(dense)
    to_search(model.image_encoder)
    gen = torch.Generator().manual_seed(1)
    for blk, choice in zip(model.image_encoder.blocks, choices):
        _set_state(blk, choice, torch.rand(blk.hidden, generator=gen) < 0.5)
        _trained_bn(blk, torch.randn(2, 4, 4, 32))
    arch = json.loads(json.dumps(rebuild(model.image_encoder)))
    build_pruned_encoder(fresh.image_encoder, arch)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval(), model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)


def test_bad_descriptions_are_refused_before_anything_changes():
    enc = _model().image_encoder
    good = {"format": "spvit-1", "blocks": [{"attn": "msa", "mlp_keep": "0-127"}] * 2}
    bad = [{"blocks": good["blocks"][:1]},
           {"blocks": [{"attn": "conv5", "mlp_keep": "0"}] * 2},
           {"blocks": [{"attn": "msa", "mlp_keep": "0-128"}] * 2},
           {"blocks": [{"attn": "msa", "mlp_keep": "0-3", "mlp_units": 5}] * 2},
           ["msa", "msa"]]
    for arch in bad:
        with pytest.raises(PruneError):
            build_pruned_encoder(enc, arch)
    assert not any(isinstance(b, PrunedBlock) for b in enc.blocks)
    build_pruned_encoder(enc, good)
    assert all(isinstance(b, PrunedBlock) for b in enc.blocks)


# -- search --------------------------------------------------------------------------------------
def _batches(n=4, size=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(2, 3, size, size, generator=gen)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        masks = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).long().expand(2, -1, -1)
        out.append({"image": images + masks[:, None] * 2.0, "mask": masks})
    return out


def test_search_moves_flops_to_a_reachable_target():
    model = _model("lora", seed=0, targets=["qkv"], rank=2)
    dense = gmacs(encoder_flops(model.image_encoder, 64)["total"])
    target = 0.8 * dense
    batches = [{k: v[:1] for k, v in b.items()} for b in _batches(3)]  # one image per step: seconds
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reachable: no warning
        result = search(model, lambda: batches, target, steps=20, arch_lr=0.2, lr=1e-3)
    assert result.history[0]["gmacs"] == pytest.approx(dense)
    assert abs(result.gmacs - target) < abs(dense - target)
    assert result.reached and abs(result.gmacs - target) <= 0.15 * target
    assert result.lam > 0
    arch = rebuild(model.image_encoder)
    assert arch == result.arch
    assert gmacs(encoder_block_flops(model.image_encoder, 64)["total"]) == pytest.approx(result.gmacs)


def test_a_too_low_target_is_refused_before_searching():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError, match="below this encoder's floor 0.000557"):
        search(model, lambda: _batches(1), 1e-6, steps=2, arch_lr=0.1)
    assert not any(isinstance(b, SearchBlock) for b in model.image_encoder.blocks)  # nothing searched
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    floor = gmacs(encoder_flops(model.image_encoder, 64)["patch_embed"] + encoder_flops(model.image_encoder, 64)["neck"])
    check_reachable(model.image_encoder, 64, floor)  # the floor itself is reachable (every step taken)
    with pytest.raises(PruneError, match="cannot be reached"):
        check_reachable(model.image_encoder, 64, floor * (1 - 1e-9))


def test_too_few_steps_for_any_gate_to_close_is_warned():
    model = _model()
    with pytest.warns(UserWarning, match="no gate can close"):
        search(model, lambda: _batches(1), 0.0008, steps=1)


# -- the gates' order ----------------------------------------------------------------------------
def _taken(enc) -> tuple[list[str], list[set[int]]]:
    return [b.choice() for b in enc.blocks], [set(b.kept_units().tolist()) for b in enc.blocks]


def test_a_one_step_search_meets_a_target_well_below_the_dense_gmacs():
    """One step at the default arch_lr closes no gate; the order it learned still meets the target, with
    the fewest steps: giving back the last one taken is above the target."""
    model = _model("lora", seed=0, targets=["qkv"], rank=2)
    dense = gmacs(encoder_flops(model.image_encoder, 64)["total"])
    target = 0.7 * dense
    seen = {}

    def log(record):  # after the last step, before the order fixes the architecture
        seen["order"] = pruning_order(model.image_encoder, 64)

    with pytest.warns(UserWarning, match="no gate can close"):
        result = search(model, lambda: _batches(1), target, steps=1, log=log)
    assert result.search_gmacs == pytest.approx(dense)  # the thresholds alone pruned nothing
    assert result.reached and result.gmacs <= target
    order = seen["order"]
    remaining = gmacs(order.remaining())
    n = int(np.argmax(remaining <= target)) + 1  # the fewest steps at or below the target
    before_last = remaining[n - 2] if n >= 2 else gmacs(order.dense)
    assert remaining[n - 1] <= target < before_last  # not over-pruned: the last step taken was needed
    assert result.gmacs == pytest.approx(remaining[n - 1])
    assert order.score[:n].max() <= order.score[n:].min()  # the steps taken are the lowest-scored
    choices, kept = _taken(model.image_encoder)
    for b, blk in enumerate(model.image_encoder.blocks):
        attn_steps = int(((order.block[:n] == b) & (order.kind[:n] == ATTN)).sum())
        assert choices[b] == ("msa", "conv3", "conv1", "skip")[attn_steps]
        dropped = set(order.index[:n][(order.block[:n] == b) & (order.kind[:n] == MLP)].tolist())
        assert kept[b] == set(range(blk.hidden)) - dropped
    arch = rebuild(model.image_encoder)
    assert arch == result.arch
    assert gmacs(encoder_block_flops(model.image_encoder, 64)["total"]) == pytest.approx(result.gmacs)


def _scored(attn: list[float], units: list[torch.Tensor]):
    """A search encoder with these thresholds, and the dense encoder's FLOPs (per block and total)."""
    enc = _model().image_encoder
    dense = encoder_block_flops(enc, 64)
    to_search(enc)
    with torch.no_grad():
        for blk, a, u in zip(enc.blocks, attn, units):
            blk.attn_thresholds.fill_(a)
            blk.mlp_thresholds.copy_(u)
    return enc, dense


@pytest.mark.parametrize("high", [0, 1])
def test_the_block_whose_gates_score_high_keeps_its_attention_longer(high):
    """Every threshold still positive (no gate closed): the order alone decides. The block scored high keeps
    MSA; the other is skipped before any MLP unit (scored between) goes, then the lowest-scored unit."""
    units = [torch.full((128,), 2.0), torch.full((128,), 2.0)]
    units[high][5] = 1.9
    enc, costs = _scored([3.0 if b == high else 1.0 for b in range(2)], units)
    low_mixer = costs["blocks"][1 - high]["mixer"]
    unit = costs["blocks"][0]["mlp"] // 128
    target = gmacs(costs["total"] - low_mixer - unit // 2)
    reached = meet_target(enc, 64, target)
    choices, kept = _taken(enc)
    assert choices[high] == "msa" and choices[1 - high] == "skip"
    assert kept[high] == set(range(128)) - {5} and kept[1 - high] == set(range(128))
    assert reached == pytest.approx(gmacs(costs["total"] - low_mixer - unit)) and reached <= target
    assert gmacs(encoder_block_flops(enc, 64)["total"]) == pytest.approx(reached)


def test_mlp_units_go_in_the_order_of_their_scores_across_blocks():
    gen = torch.Generator().manual_seed(0)
    units = [torch.randn(128, generator=gen), torch.randn(128, generator=gen)]
    enc, costs = _scored([5.0, 5.0], units)
    unit = costs["blocks"][0]["mlp"] // 128
    reached = meet_target(enc, 64, gmacs(costs["total"] - 10.5 * unit))
    assert reached == pytest.approx(gmacs(costs["total"] - 11 * unit))
    lowest = torch.cat(units).argsort()[:11].tolist()
    _, kept = _taken(enc)
    assert [set(range(128)) - k for k in kept] == [{i for i in lowest if i < 128}, {i - 128 for i in lowest if i >= 128}]
    assert _taken(enc)[0] == ["msa", "msa"]


def test_an_overshooting_search_gives_back_the_best_scored_steps_it_did_not_need():
    """The thresholds closed block 1's attention and 64 units of block 0 (all below 0); the target needs only
    the attention: the units come back, the attention stays skipped."""
    units = [torch.cat([torch.full((64,), -1.0), torch.full((64,), 1.0)]), torch.full((128,), 1.0)]
    enc, dense = _scored([2.0, -2.0], units)
    assert _taken(enc)[0] == ["msa", "skip"]
    target = gmacs(dense["total"] - dense["blocks"][1]["mixer"])
    assert gmacs(encoder_block_flops(enc, 64)["total"]) < target  # what the thresholds alone fixed
    assert meet_target(enc, 64, target) == pytest.approx(target)
    assert _taken(enc) == (["msa", "skip"], [set(range(128)), set(range(128))])
