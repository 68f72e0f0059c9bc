"""Forward FLOPs of SAM's image encoder from its structure (for model FLOPs utilisation, MFU).

Convention: one multiply-add = 2 FLOPs; every FLOP of one forward pass of the image encoder counted
once. Counted: the patch embedding, in every block the ``qkv`` and ``proj`` projections, the attention
scores ``q k^T`` and ``attn v``, the decomposed relative-position terms (``q . Rh``, ``q . Rw``), the MLP,
and the neck's two convolutions. Blocks with BRA (``model.attention=bra``) count instead, per map or
window of ``S x S`` regions of ``rt`` tokens (padded to ``S^2 * rt``): the routing affinity of the
region means (``S^4 * C`` MACs), ``q k^T`` and ``attn v`` of every padded query against its
``topk * rt`` gathered keys, the rel-pos terms of every padded query against the padded map's rows and
columns, and the LEPE depthwise conv (``k^2 * C`` MACs per token); its qkv/proj run on the unpadded
map. Not counted: norms, softmax, GELU, bias and residual additions, the position-embedding addition,
PEFT adapters (Conv-LoRA/LoRA add < 0.5 %), the prompt encoder and the mask decoder.

Windowed blocks run attention (and ``qkv``/``proj``) on the token grid padded to a multiple of the
window (SAM pads 64 -> 70 for 14-token windows at 1024 px), so those tokens are counted; the MLP runs on
the unpadded grid. ``torch.utils.flop_counter.FlopCounterMode`` gives the same total (tested).

A training step costs more than one forward: with a frozen encoder the backward pass computes the
gradients with respect to activations (about one more forward) but skips the weight gradients of frozen
layers, and checkpointing recomputes the forward once more. MFU here uses the forward FLOPs, counted
once, so it is a lower bound on the hardware's utilisation.
"""

from __future__ import annotations

import math

from torch import nn


def _attention(module: nn.Module) -> nn.Module:
    """The attention implementation under PEFT wrappers (``base_layer`` chains, e.g. VPT's)."""
    while hasattr(module, "base_layer") and not hasattr(module, "num_heads"):
        module = module.base_layer
    return module


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module under PEFT wrappers (``base_layer`` chains)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def bra_attention_flops(attn: nn.Module, qh: int, qw: int, dim: int, windows: int) -> dict[str, int]:
    """Forward FLOPs of a BRA module on ``windows`` maps of ``qh x qw`` tokens (see the module docstring)."""
    s, topk = attn.regions, attn.topk
    rh, rw = math.ceil(qh / s), math.ceil(qw / s)
    padded, rt = s * s * rh * rw, rh * rw
    parts = {"routing": 2 * windows * s ** 4 * dim,
             "attention": 2 * (2 * windows * padded * topk * rt * dim),
             "rel_pos": 2 * windows * padded * dim * s * (rh + rw) if attn.use_rel_pos else 0,
             "lepe": 2 * windows * qh * qw * dim * attn.lepe_kernel ** 2 if attn.lepe is not None else 0}
    return parts


def encoder_flops(encoder: nn.Module, height: int, width: int | None = None) -> dict[str, int]:
    """Forward FLOPs of one image of ``height`` x ``width`` through SAM's ``ImageEncoderViT``, by part."""
    width = height if width is None else width
    proj = _unwrapped(encoder.patch_embed).proj  # SAM-Adapter wraps the patch embedding
    patch_h, patch_w = proj.kernel_size
    gh, gw = height // patch_h, width // patch_w
    tokens = gh * gw
    dim = proj.out_channels
    parts = {"patch_embed": 2 * tokens * proj.in_channels * patch_h * patch_w * dim,
             "qkv_proj": 0, "attention": 0, "rel_pos": 0, "routing": 0, "lepe": 0, "mlp": 0}
    for blk in encoder.blocks:
        blk = _unwrapped(blk)  # SAM-Adapter wraps whole blocks
        ws = blk.window_size
        if ws > 0:
            hp, wp = math.ceil(gh / ws) * ws, math.ceil(gw / ws) * ws
            windows, (qh, qw) = (hp // ws) * (wp // ws), (ws, ws)
        else:
            hp, wp = gh, gw
            windows, (qh, qw) = 1, (gh, gw)
        attn_tokens = hp * wp
        length = qh * qw  # tokens per window (keys = queries)
        parts["qkv_proj"] += 2 * attn_tokens * dim * 3 * dim + 2 * attn_tokens * dim * dim
        attn = _attention(blk.attn)
        if getattr(attn, "kind", "") == "bra":
            for name, value in bra_attention_flops(attn, qh, qw, dim, windows).items():
                parts[name] += value
        else:
            parts["attention"] += 2 * (2 * windows * length * length * dim)  # q k^T and attn v, all heads
            if attn.use_rel_pos:
                parts["rel_pos"] += 2 * windows * length * dim * (qh + qw)
        hidden = _unwrapped(_unwrapped(blk.mlp).lin1).out_features  # PEFT may wrap the MLP or its Linears
        parts["mlp"] += 2 * 2 * tokens * dim * hidden
    neck_convs = [m for m in encoder.neck.modules() if isinstance(m, nn.Conv2d)]
    parts["neck"] = sum(2 * tokens * c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1]
                        for c in neck_convs)
    parts["total"] = sum(parts.values())
    return parts
