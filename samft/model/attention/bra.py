"""``bra``: Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023) on SAM's own weights.

On a token map H x W (a global block's whole map, or one window of a windowed block), split into
S x S regions of ``rh x rw = ceil(H/S) x ceil(W/S)`` tokens (the map is zero-padded to ``S*rh x S*rw``):

1. ``q, k, v`` from SAM's ``qkv`` on the unpadded map (PEFT layers on ``qkv`` see what they see in SAM).
2. Routing (no gradient, as BiFormer's default): region query/key = the mean of a region's real q/k tokens
   over all heads' channels; affinity ``A = Q_r K_r^T`` (B, S^2, S^2); each query region keeps the
   ``topk`` key regions of highest affinity, one index set shared by all heads. Regions that hold only
   padding are never chosen while real ones remain.
3. Each query attends to the tokens of its region's ``topk`` regions with SAM's scale ``head_dim ** -0.5``
   and SAM's decomposed relative-position bias at the keys' true positions; padded keys are masked.
   K and V are gathered once per (query region, chosen region) with ``index_select`` on the region
   axis, whose backward is an ``index_add`` into K/V's own size (BiFormer's ``gather`` on an expanded view
   materialises an S^2-times-larger gradient).
4. LEPE: a zero-initialised depthwise conv (``lepe_kernel``, 0 = off) on v, added before ``proj``. It is
   this module's only new parameter and trains with every PEFT method (frozen, it would stay zero).

With ``topk = S^2`` and LEPE off this is SAM's dense attention (tested to 1e-10 in float64).

Costs per query (C = channels): dense attends to all ``H*W`` keys; BRA to ``topk * rh * rw`` keys plus
the routing (``S^4 * C`` MACs per image). ``bra_attention_flops`` counts them (``samft/prune/encoder_flops.py``).

On CUDA (no extra keys, regions of a power of two >= 16 tokens) the attention runs as FlexAttention
(``torch.nn.attention.flex_attention``): tokens in region-major order, a ``BlockMask`` with one block
per region built from the routing indices and the relative-position bias as a ``score_mod``
(``_bra_flex.py``); elsewhere the explicit path below.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from samft.config import BRAConfig
from samft.model.attention import EncoderAttention, ExtraKV, register_attention


class Regions(NamedTuple):
    """Region geometry of an ``h x w`` map split into ``s x s`` regions of ``rh x rw`` tokens."""

    s: int
    rh: int
    rw: int
    h: int
    w: int

    @classmethod
    def of(cls, h: int, w: int, s: int) -> "Regions":
        return cls(s, math.ceil(h / s), math.ceil(w / s), h, w)

    @property
    def count(self) -> int:  # regions per map
        return self.s * self.s

    @property
    def tokens(self) -> int:  # tokens per region (padding included)
        return self.rh * self.rw

    @property
    def padded(self) -> bool:
        return self.s * self.rh != self.h or self.s * self.rw != self.w

    def valid(self, device: torch.device) -> torch.Tensor:
        """(S^2, rh*rw) bool: which tokens of each region are real (not padding)."""
        rows = torch.arange(self.s * self.rh, device=device) < self.h
        cols = torch.arange(self.s * self.rw, device=device) < self.w
        grid = rows[:, None] & cols[None, :]
        return grid.view(self.s, self.rh, self.s, self.rw).permute(0, 2, 1, 3).reshape(self.count, self.tokens)


def to_regions(t: torch.Tensor, g: Regions, parts: int, heads: int) -> torch.Tensor:
    """(B, H, W, parts*C) -> (parts, heads, B*S^2, rh*rw, C/heads), zero-padded, region-major."""
    b = t.shape[0]
    t = F.pad(t, (0, 0, 0, g.s * g.rw - g.w, 0, g.s * g.rh - g.h))
    t = t.view(b, g.s, g.rh, g.s, g.rw, parts, heads, -1).permute(5, 6, 0, 1, 3, 2, 4, 7)
    return t.reshape(parts, heads, b * g.count, g.tokens, -1)


def from_regions(t: torch.Tensor, g: Regions, batch: int) -> torch.Tensor:
    """(heads, B*S^2, rh*rw, hd) -> (B, H, W, heads*hd), padding cropped."""
    heads, hd = t.shape[0], t.shape[-1]
    t = t.view(heads, batch, g.s, g.s, g.rh, g.rw, hd).permute(1, 2, 4, 3, 5, 0, 6)
    return t.reshape(batch, g.s * g.rh, g.s * g.rw, heads * hd)[:, : g.h, : g.w]


@torch.no_grad()
def route(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, topk: int) -> torch.Tensor:
    """The ``topk`` key regions of every query region, shared by all heads (no gradient).

    q, k (heads, B*S^2, rh*rw, hd), zero at padding; valid (S^2, rh*rw) -> indices (B, S^2, topk) into the
    image's own S^2 regions, by decreasing affinity of the region means over all heads' channels.
    """
    count = valid.sum(-1)  # real tokens per region
    regions = valid.shape[0]
    heads, br, _, hd = q.shape

    def means(t: torch.Tensor) -> torch.Tensor:  # (B, S^2, heads*hd), at least float32
        per_region = count.clamp(min=1).repeat(br // regions)[None, :, None]
        m = t.sum(2, dtype=torch.promote_types(t.dtype, torch.float32)) / per_region
        return m.permute(1, 0, 2).reshape(br // regions, regions, heads * hd)

    affinity = means(q) @ means(k).transpose(-2, -1)  # (B, S^2, S^2)
    affinity = affinity.masked_fill(count == 0, float("-inf"))  # regions of padding only: chosen last
    return affinity.topk(topk, dim=-1).indices


def region_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, g: Regions
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed rel-pos terms of every query against every key row / column of the padded map.

    q (heads, B*S^2, rh*rw, hd) unscaled -> rel_h (heads, B*S^2, rh*rw, S*rh), rel_w (..., S*rw), where
    ``rel_h[.., query, row] = q . Rh[query row, row]`` (``get_rel_pos`` tables of the unpadded h x w map;
    zero for padded rows/columns).
    """
    hp, wp = g.s * g.rh, g.s * g.rw
    rh = F.pad(get_rel_pos(g.h, g.h, rel_pos_h), (0, 0, 0, hp - g.h, 0, hp - g.h)).to(q.dtype)  # (hp, hp, hd)
    rw = F.pad(get_rel_pos(g.w, g.w, rel_pos_w), (0, 0, 0, wp - g.w, 0, wp - g.w)).to(q.dtype)
    heads, br, _, hd = q.shape
    q6 = q.view(heads, br // g.count, g.s, g.s, g.rh, g.rw, hd)
    rel_h = torch.einsum("nbyxijd,yikd->nbyxijk", q6, rh.view(g.s, g.rh, hp, hd))
    rel_w = torch.einsum("nbyxijd,xjkd->nbyxijk", q6, rw.view(g.s, g.rw, wp, hd))
    return rel_h.reshape(heads, br, g.tokens, hp), rel_w.reshape(heads, br, g.tokens, wp)


def key_rows_cols(idx: torch.Tensor, g: Regions) -> tuple[torch.Tensor, torch.Tensor]:
    """Region indices (B, S^2, topk) -> the gathered keys' map rows (B*S^2, topk*rh) and cols (B*S^2, topk*rw)."""
    rows = (idx // g.s)[..., None] * g.rh + torch.arange(g.rh, device=idx.device)
    cols = (idx % g.s)[..., None] * g.rw + torch.arange(g.rw, device=idx.device)
    return rows.reshape(-1, idx.shape[-1] * g.rh), cols.reshape(-1, idx.shape[-1] * g.rw)


def gather_regions(t: torch.Tensor, flat: torch.Tensor, topk: int) -> torch.Tensor:
    """(heads, B*S^2, rt, hd) -> (heads, B*S^2, topk*rt, hd): each query region's chosen regions, one copy
    each (``index_select``: its backward is an ``index_add`` into t's size)."""
    heads, br, rt, hd = t.shape
    return t.index_select(1, flat).view(heads, br, topk * rt, hd)


class Routed(NamedTuple):
    """One forward's routed problem: region-major q, k, v (heads, B*S^2, rt, hd) and the indices."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    idx: torch.Tensor  # (B, S^2, topk)
    g: Regions


@register_attention("bra", help="BiFormer's Bi-Level Routing Attention: each region of queries attends to its "
                                "top-k regions of keys (model.bra); sparse, for 1536-2048 px")
class BRAAttention(EncoderAttention):
    """Bi-Level Routing Attention with SAM's ``qkv``/``proj``/rel-pos tables (see the module docstring).

    (B, H, W, C) -> (B, H, W, C). ``options``: a :class:`~samft.config.BRAConfig` (None = its defaults).
    """

    dense = False  # another function than SAM's attention (unless topk = regions**2 and LEPE is off)
    use_flex: Optional[bool] = None  # None: FlexAttention on CUDA without extra keys; True/False: force

    def __init__(self, attn: nn.Module, options: Any = None) -> None:
        super().__init__(attn, options)
        cfg = options if options is not None else BRAConfig()
        cfg.check("model.bra")
        self.regions, self.topk, self.lepe_kernel = cfg.regions, cfg.topk, cfg.lepe_kernel
        self.blocks = cfg.blocks
        self.lepe: Optional[nn.Conv2d] = None
        if cfg.lepe_kernel:
            like = self.proj.weight
            dim = like.shape[0]
            self.lepe = nn.Conv2d(dim, dim, cfg.lepe_kernel, padding=cfg.lepe_kernel // 2, groups=dim,
                                  device=like.device, dtype=like.dtype)
            if like.device.type != "meta":
                nn.init.zeros_(self.lepe.weight)
                nn.init.zeros_(self.lepe.bias)
            self.lepe.requires_grad_(True)

    @classmethod
    def applies(cls, block: nn.Module, options: Any) -> bool:
        """``blocks=global``: SAM's global-attention blocks only (``window_size == 0``); ``all``: every block."""
        blocks = options.blocks if options is not None else BRAConfig().blocks
        return blocks == "all" or getattr(block, "window_size", 0) == 0

    def prepare(self, x: torch.Tensor) -> tuple[Routed, torch.Tensor]:
        """x (B, H, W, C) -> the routed problem and v as a map (B, H, W, C) (LEPE's input)."""
        b, h, w, c = x.shape
        g = Regions.of(h, w, self.regions)
        qkv = self.qkv(x)
        q, k, v = to_regions(qkv, g, 3, self.num_heads).unbind(0)
        idx = route(q, k, g.valid(x.device), self.topk)
        return Routed(q, k, v, idx, g), qkv[..., 2 * c:]

    def forward(self, x: torch.Tensor, extra_kv: ExtraKV = None) -> torch.Tensor:
        b = x.shape[0]
        r, v_map = self.prepare(x)
        rt = r.g.tokens  # the kernel's tiles shrink to power-of-two blocks of >= 16 tokens (8 x 8 regions: 64)
        fits = rt >= 16 and rt & (rt - 1) == 0
        flex = self.use_flex if self.use_flex is not None else (x.is_cuda and extra_kv is None and fits)
        if flex:
            if extra_kv is not None:
                raise ValueError("bra: the FlexAttention path takes no extra keys (VPT prompts)")
            from samft.model.attention._bra_flex import flex_routed_attention

            out = flex_routed_attention(self, r)
        else:
            out = self.attend(r, extra_kv)
        out = from_regions(out, r.g, b)
        if self.lepe is not None:
            out = out + self.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).to(out.dtype)
        return self.proj(out)

    def attend(self, r: Routed, extra_kv: ExtraKV = None) -> torch.Tensor:
        """The explicit path: (heads, B*S^2, rt, hd) outputs of each region's queries."""
        q, g, topk = r.q, r.g, r.idx.shape[-1]
        heads, br, rt, hd = q.shape
        batch = br // g.count
        flat = (r.idx + torch.arange(batch, device=q.device)[:, None, None] * g.count).reshape(-1)
        k, v = gather_regions(r.k, flat, topk), gather_regions(r.v, flat, topk)
        bias = self.gathered_bias(r)  # (heads, B*S^2, rt, topk*rt) or None
        q3, k3 = q.reshape(heads * br, rt, hd), k.view(heads * br, topk * rt, hd)
        if bias is None:
            logits = torch.bmm(q3 * self.scale, k3.transpose(1, 2))
        else:  # one fused op, no in-place update of a view (its backward would copy the whole map)
            logits = torch.baddbmm(bias.view(heads * br, rt, topk * rt), q3 * self.scale, k3.transpose(1, 2))
        logits = logits.view(heads, br, rt, topk * rt)
        if extra_kv is not None:
            pk, pv = (t.reshape(t.shape[0], heads, -1).transpose(0, 1).to(q.dtype) for t in extra_kv)  # (heads,T,hd)
            logits = torch.cat([logits, (q * self.scale) @ pk[:, None].transpose(-2, -1)], dim=-1)
            v = torch.cat([v, pv[:, None].expand(-1, br, -1, -1)], dim=2)
        return logits.softmax(dim=-1) @ v

    def gathered_bias(self, r: Routed) -> Optional[torch.Tensor]:
        """SAM's rel-pos bias at the gathered keys' true rows/columns plus -inf at padded keys:
        (heads, B*S^2, rt, topk*rt), or None when there is neither. Every query region has chosen at least
        one region with real keys, so no softmax row is all -inf."""
        g, idx = r.g, r.idx
        heads, br, rt, _ = r.q.shape
        topk = idx.shape[-1]
        rows, cols = key_rows_cols(idx, g)  # (B*S^2, topk*rh), (B*S^2, topk*rw)
        pad_h = torch.where(rows < g.h, 0.0, float("-inf")).to(r.q.dtype)[None, :, None]
        pad_w = torch.where(cols < g.w, 0.0, float("-inf")).to(r.q.dtype)[None, :, None]
        if self.use_rel_pos:
            rel_h, rel_w = region_rel_pos(r.q, self.rel_pos_h, self.rel_pos_w, g)
            rel_h = rel_h.gather(-1, rows[None, :, None, :].expand(heads, -1, rt, -1))
            rel_w = rel_w.gather(-1, cols[None, :, None, :].expand(heads, -1, rt, -1))
            if g.padded:
                rel_h, rel_w = rel_h + pad_h, rel_w + pad_w
        elif g.padded:
            rel_h, rel_w = pad_h.expand(heads, -1, rt, -1), pad_w.expand(heads, -1, rt, -1)
        else:
            return None
        bias = rel_h.view(heads, br, rt, topk, g.rh, 1) + rel_w.view(heads, br, rt, topk, 1, g.rw)
        return bias.view(heads, br, rt, topk * rt)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, regions={self.regions}, topk={self.topk}, "
                f"lepe_kernel={self.lepe_kernel}, blocks={self.blocks}")
