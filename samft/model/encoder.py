"""SAM's image encoder as explicit stages, so a transform can replace a block with another module.

The contract (``segment_anything``'s ``ImageEncoderViT``, stated once here)::

    embed(images (B, 3, H, W))   -> x (B, H/16, W/16, C)   patch embedding + absolute position embedding
                                                            (interpolated to the token grid)
    encoder.blocks[i](x)          -> (B, h, w, C)           tokens on the 2-D grid, channels last, same shape
                                                            (a windowed block partitions into windows and
                                                            merges them back itself)
    neck(x)                      -> (B, out_chans, h, w)    channels first, for the mask decoder

Any module with that block contract may stand in ``encoder.blocks``: a BRA
attention block, a pruned SPViT block, a checkpointed wrapper. A module in ``blocks`` may produce named
auxiliary losses the same way PEFT layers do: ``aux_name`` declares the name and forward adds the value
to the open aux-loss sink (:func:`samft.tasks.terms.active_aux_sink`), if any;
:class:`~samft.model.semantic.SemanticSAM` opens one around its forward pass and returns the sums.
"""

from __future__ import annotations

import torch
from torch import nn

from samft.model.sam import interpolate_pos_embed


def embed(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/16, W/16, C): patch embedding plus the (interpolated) position embedding."""
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + interpolate_pos_embed(encoder.pos_embed, tuple(x.shape[1:3]))
    return x


def neck(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) -> (B, out_chans, h, w)."""
    return encoder.neck(x.permute(0, 3, 1, 2))
