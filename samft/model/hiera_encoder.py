"""SAM 2.1's image encoder (Hiera trunk + FPN neck) as explicit stages, with SAM 1's block names.

:class:`HieraEncoder` takes over the modules of ``sam2``'s ``ImageEncoder`` so that samft's registries see
what they see on SAM 1: ``blocks[i].attn.qkv`` / ``.attn.proj`` (Hiera's ``MultiScaleAttention``),
``blocks[i].norm1`` / ``.norm2`` and ``blocks[i].mlp.lin1`` / ``.mlp.lin2`` (Hiera's two-layer MLP given
SAM 1's ``MLPBlock`` form: the same Linears, GELU between them, the same function). The contract::

    embed(images (B, 3, H, W)) -> x (B, H/4, W/4, C)      patch embedding + windowed position embedding
                                                          (interpolated to the grid, as Hiera does)
    blocks[i](x)               -> (B, h', w', C')         Hiera's blocks; the first block of stages 2-4
                                                          pools its queries (h' = h/2) and widens C
    levels(outputs)            -> [s4, s8, s16]           the FPN neck on the four stage outputs
                                                          (``stage_ends``), the stride-32 level dropped
                                                          (``scalp=1``), channels first

State-dict names differ from the official ones only by the trunk prefix and the MLP's layer names;
:func:`official_key` maps one to the other (merged exports write the official layout).
"""

from __future__ import annotations

import re

import torch
from segment_anything.modeling.common import MLPBlock
from torch import nn


def _as_mlp_block(mlp: nn.Module) -> MLPBlock:
    """sam2's two-layer ``MLP`` (GELU) as SAM 1's ``MLPBlock`` holding the same Linears."""
    if len(mlp.layers) != 2 or getattr(mlp, "sigmoid_output", False):
        raise ValueError("a Hiera block's MLP has two layers and no output sigmoid")
    lin1, lin2 = mlp.layers
    block = MLPBlock.__new__(MLPBlock)
    nn.Module.__init__(block)
    block.lin1, block.act, block.lin2 = lin1, mlp.act, lin2
    return block


class HieraEncoder(nn.Module):
    """The Hiera trunk and FPN neck of one ``sam2`` ``ImageEncoder`` (see the module docstring)."""

    def __init__(self, image_encoder: nn.Module, img_size: int) -> None:
        super().__init__()
        trunk = image_encoder.trunk
        self.patch_embed = trunk.patch_embed
        self.pos_embed = trunk.pos_embed
        self.pos_embed_window = trunk.pos_embed_window
        for block in trunk.blocks:
            block.mlp = _as_mlp_block(block.mlp)
        self.blocks = trunk.blocks
        self.stage_ends = tuple(trunk.stage_ends)
        self.neck = image_encoder.neck
        self.scalp = image_encoder.scalp
        self.img_size = img_size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/4, W/4, C): patch embedding plus Hiera's windowed position embedding."""
        from sam2.modeling.backbones.hieradet import Hiera

        x = self.patch_embed(images)
        return x + Hiera._get_pos_embed(self, x.shape[1:3])

    def levels(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The four stage outputs (B, h, w, C) -> the FPN's levels (B, d_model, h, w), highest resolution
        first, without the ``scalp`` lowest ones: [stride 4, stride 8, stride 16]."""
        features, _ = self.neck([x.permute(0, 3, 1, 2) for x in outputs])
        return features[: len(features) - self.scalp] if self.scalp else features


_MLP = {"lin1": "layers.0", "lin2": "layers.1"}


def official_key(name: str) -> str:
    """A :class:`HieraEncoder` state-dict name -> the name inside ``sam2``'s ``ImageEncoder``."""
    if name.startswith("neck."):
        return name
    name = re.sub(r"\.mlp\.(lin1|lin2)\.", lambda m: f".mlp.{_MLP[m.group(1)]}.", name)
    return f"trunk.{name}"
