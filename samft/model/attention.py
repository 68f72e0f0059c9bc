"""Fast encoder attention: SAM's ``Attention`` computed by ``F.scaled_dot_product_attention``.

SAM's ``Attention.forward`` materialises the attention map, adds the decomposed relative-position bias
(MViTv2) to it, applies softmax and multiplies by ``v``: three (B*heads, L, L) tensors are kept for the
backward pass. :class:`SDPAAttention` computes the same function with PyTorch's fused attention, passing
the relative-position bias as an additive mask::

    bias[b, n, (qh, qw), (kh, kw)] = q[b, n, qh, qw] . Rh[qh, kh] + q[b, n, qh, qw] . Rw[qw, kw]
    out = softmax(scale * q k^T + bias) v

where ``Rh``/``Rw`` are ``segment_anything``'s own ``get_rel_pos`` tables (interpolated when the token
grid differs from the one the tables were made for). The bias still has L x L entries per head, but the
fused kernels (memory-efficient on CUDA, flash on CPU) do not keep the attention map or its softmax.

:func:`set_attention` swaps the class of every ``Attention`` module of an encoder in place, so every
attribute, parameter and state-dict key (``qkv``, ``proj``, ``num_heads``, ``scale``, ``use_rel_pos``,
``rel_pos_h``, ``rel_pos_w``) stays as it is: PEFT methods that wrap ``attn.qkv`` or ``blk.attn`` and
saved adapters work unchanged. Apply it before the PEFT method.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from samft.errors import ConfigError

ATTENTION_IMPLS = ("sdpa", "eager")


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 q_size: Tuple[int, int], k_size: Tuple[int, int]) -> torch.Tensor:
    """The decomposed relative-position bias of SAM's attention as an additive mask.

    q (B, heads, qh*qw, hd) (unscaled, as in SAM) -> bias (B, heads, qh*qw, kh*kw), in q's dtype.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h)  # (qh, kh, hd)
    rw = get_rel_pos(q_w, k_w, rel_pos_w)  # (qw, kw, hd)
    b, n, _, dim = q.shape
    r_q = q.reshape(b, n, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh.to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw.to(q.dtype))
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, qh, qw, kh, kw)
    return bias.reshape(b, n, q_h * q_w, k_h * k_w)


class SDPAAttention(Attention):
    """``segment_anything``'s ``Attention`` through ``scaled_dot_product_attention`` (same parameters).

    Not constructed directly: :func:`set_attention` turns existing ``Attention`` modules into it.
    x (B, H, W, C) -> (B, H, W, C).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, H*W, head_dim)
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = None
        if self.use_rel_pos:
            mask = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            if mask.requires_grad and not (q.requires_grad or k.requires_grad or v.requires_grad):
                # only the rel-pos tables train here: the memory-efficient CUDA kernel's backward fails
                # when the mask alone needs a gradient (pytorch/pytorch#148476); SAM's own path is exact
                return super().forward(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


_CLASSES = {"sdpa": SDPAAttention, "eager": Attention}


def set_attention(encoder: nn.Module, impl: str = "sdpa") -> int:
    """Make every SAM ``Attention`` in ``encoder`` use ``impl`` (sdpa or eager); returns how many."""
    if impl not in _CLASSES:
        raise ConfigError(f"model.attention: {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    cls = _CLASSES[impl]
    count = 0
    for module in encoder.modules():
        if type(module) in (Attention, SDPAAttention):
            module.__class__ = cls
            count += 1
    return count


def attention_impl(encoder: nn.Module) -> str:
    """``sdpa``, ``eager`` or ``mixed``/``none``: what the encoder's attention modules use."""
    kinds = {"sdpa" if type(m) is SDPAAttention else "eager"
             for m in encoder.modules() if type(m) in (Attention, SDPAAttention)}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")
