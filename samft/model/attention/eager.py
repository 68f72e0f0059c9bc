"""``eager``: segment_anything's own attention computation (the plain reference), with extra keys."""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from samft.model.attention import EncoderAttention, ExtraKV, register_attention


@register_attention("eager", help="segment_anything's own attention: the explicit map, softmax and product")
class EagerAttention(EncoderAttention):
    """SAM's ``Attention.forward``, op for op; ``extra_kv`` keys get no position bias. (B, H, W, C) -> same."""

    def forward(self, x: torch.Tensor, extra_kv: ExtraKV = None) -> torch.Tensor:
        b, h, w, _ = x.shape
        heads = self.num_heads
        q, k, v = self.split_qkv(x)  # (B, heads, HW, hd)
        q, qh, qw = self.pool_q(q, h, w)  # Hiera's stage changes pool the queries
        q, k, v = (t.reshape(b * heads, t.shape[2], -1) for t in (q, k, v))
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            logits = add_decomposed_rel_pos(logits, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        if extra_kv is not None:
            pk, pv = (t.reshape(b * heads, t.shape[2], -1) for t in self.heads_kv(extra_kv, b, q.dtype))
            logits = torch.cat([logits, (q * self.scale) @ pk.transpose(-2, -1)], dim=-1)
            v = torch.cat([v, pv], dim=1)
        weights = logits.softmax(dim=-1)
        out = (weights @ v).view(b, heads, qh * qw, -1)
        return self.merge_heads(out, qh, qw)
