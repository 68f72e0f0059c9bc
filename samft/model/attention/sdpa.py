"""``sdpa``: SAM's attention computed by ``F.scaled_dot_product_attention`` (the default).

SAM's ``Attention.forward`` materialises the attention map, adds the decomposed relative-position bias
to it, applies softmax and multiplies by ``v``: three (B*heads, L, L) tensors are kept for the backward
pass. This computes the same function with PyTorch's fused attention, passing the relative-position
bias (:func:`~samft.model.attention.bias.rel_pos_bias`) as an additive mask. The bias still has L x L
entries per head, but the fused kernels (memory-efficient on CUDA, flash on CPU) do not keep the
attention map or its softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samft.model.attention import EncoderAttention, ExtraKV, register_attention
from samft.model.attention.bias import rel_pos_bias


@register_attention("sdpa", help="SAM's attention through fused scaled_dot_product_attention (same function)")
class SDPAAttention(EncoderAttention):
    """SAM's attention through ``scaled_dot_product_attention``. (B, H, W, C) -> same."""

    def forward(self, x: torch.Tensor, extra_kv: ExtraKV = None) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = self.split_qkv(x)
        q, h, w = self.pool_q(q, h, w)  # Hiera's stage changes pool the queries (no rel-pos there)
        mask = None
        if self.use_rel_pos:
            mask = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            if mask.requires_grad and not (q.requires_grad or k.requires_grad or v.requires_grad):
                # only the rel-pos tables train here: the memory-efficient CUDA kernel's backward fails
                # when the mask alone needs a gradient (pytorch/pytorch#148476); the explicit path is exact
                return self._explicit(q, k, v, mask, extra_kv, h, w)
        if extra_kv is not None:
            pk, pv = self.heads_kv(extra_kv, b, q.dtype)
            k, v = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)
            if mask is not None:
                mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pk.shape[2])], dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.merge_heads(out, h, w)

    def _explicit(self, q, k, v, bias, extra_kv: ExtraKV, h: int, w: int) -> torch.Tensor:
        logits = (q * self.scale) @ k.transpose(-2, -1) + bias
        if extra_kv is not None:
            pk, pv = self.heads_kv(extra_kv, q.shape[0], q.dtype)
            logits = torch.cat([logits, (q * self.scale) @ pk.transpose(-2, -1)], dim=-1)
            v = torch.cat([v, pv], dim=2)
        return self.merge_heads(logits.softmax(dim=-1) @ v, h, w)
