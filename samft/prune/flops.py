"""Forward FLOPs of an encoder whose blocks are SAM's, SPViT search blocks or pruned blocks.

Same convention as ``samft.prune.encoder_flops`` (1 multiply-add = 2 FLOPs; norms, BatchNorm, activations,
biases and residual additions not counted; equal to ``torch.utils.flop_counter.FlopCounterMode``, tested),
whose ``encoder_flops`` gives the patch embedding and the neck. Per block, on a ``gh`` x ``gw`` token grid
(``T = gh * gw`` tokens, width ``C``, ``d = C / heads``):

- MSA: SAM's formula (``samft.prune.encoder_flops``): ``qkv``/``proj`` on the grid padded to whole windows,
  ``q k^T`` and ``attn v`` per window (or on the whole grid in a global block), the decomposed
  relative-position terms;
- k x k bottleneck conv (k = 3 or 1): ``2 T (C d k^2 + d C)`` (the conv, zero-padded to T outputs, and
  the expansion back to C);
- skip: 0;
- MLP: ``4 T C u`` for ``u`` kept hidden units.

SPViT's own code counts multiply-adds ("FLOPs" in the paper = MACs); so does ``target_gmacs``:
``GMACs = FLOPs / 2e9``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from samft.prune.encoder_flops import encoder_flops
from samft.prune.errors import PruneError
from samft.prune.rebuild import PrunedBlock
from samft.prune.search_block import SearchBlock, attention_core, out_features


def token_grid(encoder: nn.Module, height: int, width: int | None = None) -> tuple[int, int]:
    """(gh, gw) tokens for an image of ``height`` x ``width``."""
    ph, pw = encoder.patch_embed.proj.kernel_size
    return height // ph, (height if width is None else width) // pw


def stem_flops(encoder: nn.Module, height: int, width: int | None = None) -> int:
    """The patch embedding and the neck (``samft.prune.encoder_flops.encoder_flops`` with no blocks)."""
    parts = encoder_flops(SimpleNamespace(patch_embed=encoder.patch_embed, blocks=[], neck=encoder.neck),
                          height, width)
    return parts["patch_embed"] + parts["neck"]


def msa_flops(dim: int, window_size: int, use_rel_pos: bool, gh: int, gw: int) -> int:
    """SAM's attention of one block (see ``samft.prune.encoder_flops``)."""
    if window_size > 0:
        hp, wp = math.ceil(gh / window_size) * window_size, math.ceil(gw / window_size) * window_size
        windows, (qh, qw) = (hp // window_size) * (wp // window_size), (window_size, window_size)
    else:
        hp, wp, windows, (qh, qw) = gh, gw, 1, (gh, gw)
    length = qh * qw
    total = 2 * hp * wp * dim * 4 * dim + 4 * windows * length * length * dim
    return total + (2 * windows * length * dim * (qh + qw) if use_rel_pos else 0)


def conv_flops(dim: int, bottleneck: int, kernel: int, tokens: int) -> int:
    return 2 * tokens * (dim * bottleneck * kernel * kernel + bottleneck * dim)


def mlp_flops(dim: int, units: int, tokens: int) -> int:
    return 4 * tokens * dim * units


def choice_costs(block: SearchBlock, gh: int, gw: int) -> dict[str, int]:
    """FLOPs of each attention choice of a search block, and of one MLP unit."""
    tokens = gh * gw
    return {"msa": msa_flops(block.dim, block.window_size, block.use_rel_pos, gh, gw),
            "conv3": conv_flops(block.dim, block.head_dim, 3, tokens),
            "conv1": conv_flops(block.dim, block.head_dim, 1, tokens), "skip": 0,
            "mlp_unit": mlp_flops(block.dim, 1, tokens)}


def block_flops(block: nn.Module, gh: int, gw: int) -> dict[str, int]:
    """{"mixer": ..., "mlp": ...} FLOPs of a SAM, search (as its thresholds fix it now) or pruned block."""
    tokens = gh * gw
    if isinstance(block, SearchBlock):
        costs = choice_costs(block, gh, gw)
        return {"mixer": costs[block.choice()], "mlp": costs["mlp_unit"] * int(block.kept_units().numel())}
    if isinstance(block, PrunedBlock):
        if block.attn is not None:
            core = attention_core(block.attn)
            mixer = msa_flops(block.norm1.normalized_shape[0], block.window_size, bool(core.use_rel_pos), gh, gw)
        elif block.conv is not None:
            conv = block.conv.reduce
            mixer = conv_flops(conv.in_channels, conv.out_channels, block.conv.kernel, tokens)
        else:
            mixer = 0
        dim = block.norm2.normalized_shape[0] if block.mlp is not None else 0
        return {"mixer": mixer, "mlp": mlp_flops(dim, block.mlp_units, tokens)}
    if hasattr(block, "attn") and hasattr(block, "mlp"):
        core = attention_core(block.attn)
        dim = block.norm1.normalized_shape[0]
        return {"mixer": msa_flops(dim, block.window_size, bool(core.use_rel_pos), gh, gw),
                "mlp": mlp_flops(dim, out_features(block.mlp.lin1), tokens)}
    raise PruneError(f"no FLOPs formula for encoder block {type(block).__name__}")


def encoder_block_flops(encoder: nn.Module, height: int, width: int | None = None) -> dict:
    """{"stem": patch embedding + neck, "blocks": [{"mixer", "mlp"} per block], "total"} FLOPs."""
    gh, gw = token_grid(encoder, height, width)
    blocks = [block_flops(b, gh, gw) for b in encoder.blocks]
    stem = stem_flops(encoder, height, width)
    return {"stem": stem, "blocks": blocks, "total": stem + sum(b["mixer"] + b["mlp"] for b in blocks)}


def search_flops(encoder: nn.Module, height: int, width: int | None = None) -> torch.Tensor:
    """Differentiable FLOPs of a search encoder (float64 scalar): the architecture the thresholds fix now,
    with straight-through gradients to every threshold (SPViT's complexity term)::

        F = stem + sum_blocks i1 c1 + i2 (c3 - c1) + i3 (msa - c3) + unit * sum(m)
    """
    gh, gw = token_grid(encoder, height, width)
    total = None
    for i, blk in enumerate(encoder.blocks):
        if not isinstance(blk, SearchBlock):
            raise PruneError(f"encoder block {i} is {type(blk).__name__}, not a SearchBlock")
        c = choice_costs(blk, gh, gw)
        att, units = blk.flops_indicators()
        att, units = att.double(), units.double()
        term = att[0] * c["conv1"] + att[1] * (c["conv3"] - c["conv1"]) + att[2] * (c["msa"] - c["conv3"])
        term = term + units.sum() * c["mlp_unit"]
        total = term if total is None else total + term
    stem = float(stem_flops(encoder, height, width))
    return stem + total if total is not None else torch.tensor(stem, dtype=torch.float64)


def gmacs(flops: float | torch.Tensor) -> float | torch.Tensor:
    """FLOPs -> GMACs (1 MAC = 2 FLOPs)."""
    return flops / 2e9
