"""BRA's attention as FlexAttention (CUDA): a region-level ``BlockMask`` and the rel-pos bias as ``score_mod``.

Imported only when used (``torch.nn.attention.flex_attention`` pulls in the compiler stack). Tokens are
in region-major order (region r holds positions ``r*rt .. r*rt+rt-1``), so one region = one block of
``rt = rh*rw`` queries or keys; the routing indices are the block mask's key blocks. On CUDA the kernel
is ``torch.compile``d (Triton); elsewhere FlexAttention's eager reference runs (tests only).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from samft.model.attention.bra import Routed, region_rel_pos

_COMPILED: list[Callable] = []


def _flex() -> Callable:
    if not _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _COMPILED[0]


def _compact(idx: torch.Tensor, keep: torch.Tensor, regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen regions where ``keep`` holds, first: (B, 1, S^2) counts and (B, 1, S^2, S^2) int32 indices."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    chosen = idx.gather(-1, order)
    indices = torch.zeros(*idx.shape[:2], regions, dtype=torch.int32, device=idx.device)
    indices[..., : idx.shape[-1]] = chosen.to(torch.int32)
    return keep.sum(-1, dtype=torch.int32)[:, None], indices[:, None]


def block_mask(r: Routed):
    """The ``BlockMask`` of the routing: query block (region) i attends to key blocks ``idx[b, i, :]``.

    A FlexAttention mask is defined by its ``mask_mod`` (the fused kernel skips the blocks the block mask
    leaves out and evaluates ``mask_mod`` only in partial blocks; the reference evaluates it everywhere),
    so ``mask_mod`` states the routing itself plus the padding: chosen regions without padding are full
    blocks, chosen regions with padding partial ones.
    """
    from torch.nn.attention.flex_attention import BlockMask

    g, idx = r.g, r.idx
    b, regions, topk = idx.shape
    valid = g.valid(idx.device)
    full = (valid.sum(-1) == g.tokens)[idx]  # (B, S^2, topk): chosen region holds no padding
    allowed = torch.zeros(b, regions, regions, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
    valid, rt = valid.reshape(-1), g.tokens

    def mask_mod(batch, head, q_idx, kv_idx):
        return allowed[batch, q_idx // rt, kv_idx // rt] & valid[kv_idx]

    partial_num, partial_idx = _compact(idx, ~full, regions)
    full_num, full_idx = _compact(idx, full, regions)
    length = regions * rt
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=rt, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


def flex_routed_attention(attn: Any, r: Routed) -> torch.Tensor:
    """Routed attention of ``attn`` (a BRAAttention) through FlexAttention: (heads, B*S^2, rt, hd) outputs."""
    g = r.g
    heads, br, rt, hd = r.q.shape
    batch = br // g.count

    def seq(t: torch.Tensor) -> torch.Tensor:  # (heads, B*S^2, rt, d) -> (B, heads, S^2*rt, d)
        return t.reshape(heads, batch, g.count * rt, t.shape[-1]).transpose(0, 1).contiguous()

    score_mod = None
    if attn.use_rel_pos:
        rel_h, rel_w = (seq(t) for t in region_rel_pos(r.q, attn.rel_pos_h, attn.rel_pos_w, g))

        def score_mod(score, b, h, q_idx, kv_idx):
            region, i = kv_idx // rt, kv_idx % rt
            row = (region // g.s) * g.rh + i // g.rw
            col = (region % g.s) * g.rw + i % g.rw
            return score + rel_h[b, h, q_idx, row] + rel_w[b, h, q_idx, col]

    q, k, v = seq(r.q), seq(r.k), seq(r.v)
    if q.is_cuda:
        out = _flex()(q, k, v, score_mod=score_mod, block_mask=block_mask(r), scale=attn.scale)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask(r), scale=attn.scale)
    return out.transpose(0, 1).reshape(heads, br, rt, hd)
