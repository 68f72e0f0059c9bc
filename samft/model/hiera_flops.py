"""Forward FLOPs of SAM 2.1's image encoder (Hiera trunk + FPN neck) from its structure.

The convention of :mod:`samft.prune.encoder_flops` (SAM 1's ViT): one multiply-add = 2 FLOPs, one image,
one forward pass, every matrix product and convolution counted once. Counted: the patch embedding
(7x7 conv, stride 4); in every block ``qkv`` (on the token grid padded to a multiple of the window),
the attention scores ``q k^T`` and ``attn v`` (the pooled queries of a stage's first block against the
window's keys), ``proj`` (on the pooled queries), the width-changing ``proj`` of a stage's first block (on
the unpooled grid) and the MLP (on the block's output grid); the FPN neck's 1x1 lateral convolutions on
all four stage outputs (the stride-32 level is computed, then dropped by ``scalp``). Not counted: norms,
softmax, GELU, max-pooling, biases and residual additions, the position embeddings, the nearest-neighbour
top-down upsampling, PEFT adapters, the prompt encoder and the mask decoder.
``torch.utils.flop_counter.FlopCounterMode`` gives the same total (tested, tiny and hiera_t at 1024 px).
"""

from __future__ import annotations

import math

from torch import nn


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module under PEFT wrappers (``base_layer`` chains)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _block_flops(blk: nn.Module, gh: int, gw: int, parts: dict[str, int]) -> tuple[int, int]:
    """Add one Hiera block's FLOPs on a ``gh x gw`` grid to ``parts``; returns its output grid."""
    d, d_out, ws = blk.dim, blk.dim_out, blk.window_size
    s = blk.q_stride[0] if blk.q_stride else 1
    if d != d_out:
        parts["qkv_proj"] += 2 * gh * gw * d * d_out  # blocks.i.proj: the shortcut's width change
    if ws > 0:
        hp, wp = math.ceil(gh / ws) * ws, math.ceil(gw / ws) * ws
        windows, keys, queries = (hp // ws) * (wp // ws), ws * ws, (ws // s) ** 2
    else:
        hp, wp = gh, gw
        windows, keys, queries = 1, gh * gw, (gh // s) * (gw // s)
    parts["qkv_proj"] += 2 * hp * wp * d * 3 * d_out + 2 * windows * queries * d_out * d_out
    parts["attention"] += 2 * (2 * windows * queries * keys * d_out)  # q k^T and attn v, all heads
    oh, ow = gh // s, gw // s
    hidden = _unwrapped(_unwrapped(blk.mlp).lin1).out_features  # PEFT may wrap the MLP or its Linears
    parts["mlp"] += 2 * 2 * oh * ow * d_out * hidden
    return oh, ow


def hiera_flops(encoder: nn.Module, height: int, width: int | None = None) -> dict[str, int]:
    """Forward FLOPs of one ``height x width`` image through a :class:`~samft.model.hiera_encoder.HieraEncoder`
    (trunk + neck), by part (see the module docstring)."""
    width = height if width is None else width
    proj = _unwrapped(encoder.patch_embed).proj
    (kh, kw), (sh, sw), (ph, pw) = proj.kernel_size, proj.stride, proj.padding
    gh, gw = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    parts = {"patch_embed": 2 * gh * gw * proj.in_channels * kh * kw * proj.out_channels,
             "qkv_proj": 0, "attention": 0, "mlp": 0, "neck": 0}
    levels = []  # (tokens, channels) of each stage output
    for i, blk in enumerate(encoder.blocks):
        blk = _unwrapped(blk)
        gh, gw = _block_flops(blk, gh, gw, parts)
        if i in encoder.stage_ends:
            levels.append((gh * gw, blk.dim_out))
    for (tokens, channels), lateral in zip(reversed(levels), encoder.neck.convs):  # convs[0]: the last stage's
        conv = next(m for m in lateral.modules() if isinstance(m, nn.Conv2d))
        parts["neck"] += 2 * tokens * channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    parts["total"] = sum(parts.values())
    return parts
