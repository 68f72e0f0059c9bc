"""SAM's decomposed relative-position bias (MViTv2) as an additive attention mask."""

from __future__ import annotations

from typing import Tuple

import torch
from segment_anything.modeling.image_encoder import get_rel_pos


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 q_size: Tuple[int, int], k_size: Tuple[int, int]) -> torch.Tensor:
    """The decomposed relative-position bias of SAM's attention as an additive mask.

    q (B, heads, qh*qw, hd) (unscaled, as in SAM) -> bias (B, heads, qh*qw, kh*kw), in q's dtype::

        bias[b, n, (qh, qw), (kh, kw)] = q[b, n, qh, qw] . Rh[qh, kh] + q[b, n, qh, qw] . Rw[qw, kw]

    where ``Rh``/``Rw`` are ``segment_anything``'s own ``get_rel_pos`` tables (interpolated when the token
    grid differs from the one the tables were made for).
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
