"""The encoder FLOPs formula (used for MFU) equals torch's FLOP counter, tiny and official sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from samft.model import build_model
from samft.prune.encoder_flops import encoder_flops

from conftest import tiny_config


def _counted(model, images):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode(images)
    return counter.get_total_flops()


# segment_anything's eager attention: the counter does not register the CPU fused-attention kernel
@pytest.mark.parametrize("hw", [(64, 64), (80, 48)])  # 80/16 = 5 tokens: windows of 2 padded to 6
def test_formula_equals_flop_counter_tiny(hw):
    model = build_model(tiny_config("decoder_only", model={"attention": "eager"})).model.eval()
    counted = _counted(model, torch.randn(1, 3, *hw))
    assert encoder_flops(model.image_encoder, *hw)["total"] == counted


# the published encoder costs are 487 GMACs (ViT-B), 1.49 TMACs (ViT-L), 2.98 TMACs (ViT-H); 1 MAC = 2 FLOPs
@pytest.mark.parametrize("sam_type,img_size,gflops", [("vit_b", 1024, 972.1), ("vit_l", 1024, 2985.7),
                                                      ("vit_h", 1024, 5961.1)])
def test_formula_equals_flop_counter_official_sizes(sam_type, img_size, gflops):
    """Structure only (meta device, no weights), per image at 1024 px."""
    cfg = tiny_config("decoder_only", model={"type": sam_type, "img_size": img_size, "attention": "eager"})
    model = build_model(cfg, meta=True).model.eval()
    counted = _counted(model, torch.empty(1, 3, img_size, img_size, device="meta"))
    flops = encoder_flops(model.image_encoder, img_size)
    assert flops["total"] == counted
    assert flops["total"] / 1e9 == pytest.approx(gflops, rel=1e-3)


# BRA (routing, gathered attention, rel-pos at the gathered keys, LEPE) in the global block or every block;
# 80 x 48 px = a 5 x 3 grid that 2 regions do not divide (padded 6 x 4); the other blocks eager (counted)
@pytest.mark.parametrize("blocks", ["global", "all"])
@pytest.mark.parametrize("hw", [(64, 64), (80, 48), (96, 64)])
@pytest.mark.parametrize("regions,topk,lepe", [(2, 2, 3), (3, 9, 0)])
def test_formula_equals_flop_counter_bra(blocks, hw, regions, topk, lepe):
    from samft.model.attention import convert_attention

    bra = {"regions": regions, "topk": topk, "lepe_kernel": lepe, "blocks": blocks}
    model = build_model(tiny_config("decoder_only", model={"attention": "bra", "bra": bra})).model.eval()
    for blk in model.image_encoder.blocks:
        if blk.attn.kind != "bra":
            blk.attn = convert_attention(blk.attn, "eager")
    assert [b.attn.kind for b in model.image_encoder.blocks] == (["eager", "bra"] if blocks == "global" else ["bra"] * 2)
    counted = _counted(model, torch.randn(1, 3, *hw))
    flops = encoder_flops(model.image_encoder, *hw)
    assert flops["total"] == counted
    assert flops["routing"] > 0 and (flops["lepe"] > 0) == bool(lepe)
