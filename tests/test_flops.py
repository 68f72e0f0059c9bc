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


# SAM 2.1: the Hiera trunk + FPN neck (samft/model/hiera_flops.py), eager attention (counted as bmm); 160 px
# pads the tiny's third stage (10 x 10 tokens) to windows of 4; hiera_t at 1024 px pads 64 -> 70 (windows of 14)
@pytest.mark.parametrize("model_type,img_size", [("tiny", 64), ("tiny", 160), ("hiera_t", 1024)])
def test_hiera_formula_equals_flop_counter(model_type, img_size):
    from samft.model.hiera_flops import hiera_flops

    official = model_type != "tiny"
    cfg = tiny_config("decoder_only", model={"family": "sam2", "type": model_type, "img_size": img_size,
                                             "attention": "eager", "checkpoint": None})
    model = build_model(cfg, meta=official).model.eval()
    images = torch.empty(1, 3, img_size, img_size, device="meta") if official else torch.randn(1, 3, img_size, img_size)
    flops = hiera_flops(model.image_encoder, img_size)
    assert flops["total"] == _counted(model, images)  # exact: the same products, counted the same way
    assert all(v > 0 for v in flops.values())


def test_info_counts_an_official_hiera_on_the_meta_device():
    """``samft info`` on hiera_b+ (no checkpoint read): its GMACs are Hiera's count, not the ViT formula's."""
    from samft.model import describe
    from samft.model.hiera_flops import hiera_flops

    cfg = tiny_config("lora", model={"family": "sam2", "type": "hiera_b+", "img_size": 1024, "checkpoint": None})
    info = describe(cfg)
    encoder = build_model(cfg, meta=True).model.image_encoder
    assert info["encoder_gmacs"] == round(hiera_flops(encoder, 1024)["total"] / 2e9, 3) == pytest.approx(322.6, abs=0.1)
