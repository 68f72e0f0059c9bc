"""``vpt``: deep visual prompt tuning (Jia et al., ECCV 2022) for SAM's windowed encoder.

In VPT-deep every block gets ``num_tokens`` learnable prompt tokens that join the token sequence; the
outputs at the prompt positions are dropped before the next block, so the prompts act only through
the attention, as extra keys and values. SAM's encoder keeps its tokens on a 2-D grid and partitions
it into windows, so here that effect is implemented directly: each block's prompts are normalised by
the block's (frozen) ``norm1`` like any token, turned into keys and values by its frozen ``qkv``, and
appended to the keys and values of every window (or of the whole map in a global block). The 2-D
layout, the windows and the spatial tokens' relative-position bias stay as they are; prompt keys get no
position bias. The prompts go through the encoder's own attention implementation (``model.attention``)
as its ``extra_kv`` (see ``samft.model.attention``).

Unlike zero-initialised adapters, prompts change the output from the start (they take part of every
softmax). Not mergeable.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from samft.constants import PATCH
from samft.config.peft.vpt import VPTConfig
from samft.peft.inject import AdapterLayer, replace_modules
from samft.peft.registry import register



class VPTAttention(AdapterLayer):
    """SAM's attention with ``num_tokens`` learnable prompts as extra keys and values.

    Input (N, ws, ws, C) windows or (B, H, W, C) maps -> same shape. ``norm`` is the block's ``norm1``
    (held by the block, not registered here), applied to the prompts as to every token.
    """

    def __init__(self, base_layer: nn.Module, norm: nn.Module, num_tokens: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_norm", norm)  # shared with the block; not a sub-module of this layer
        like = base_layer.qkv.weight
        dim = base_layer.qkv.in_features
        self.prompts = nn.Parameter(torch.empty(num_tokens, dim, device=like.device, dtype=like.dtype))
        bound = math.sqrt(6.0 / float(3 * PATCH * PATCH + dim))  # VPT's Xavier-uniform bound
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def prompt_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' keys and values (T, C) each, from the block's frozen norm1 and qkv."""
        p = self._norm(self.dropout(self.prompts))
        _, k, v = self.base_layer.qkv(p).chunk(3, dim=-1)
        return k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x, extra_kv=self.prompt_kv())


def _block_attention(name: str, module: nn.Module) -> bool:
    parts = name.split(".")
    return (len(parts) == 3 and parts[0] == "blocks" and parts[2] == "attn"
            and isinstance(getattr(module, "qkv", None), nn.Linear))


@register("vpt", VPTConfig, help="deep visual prompts: learnable extra keys/values in every block's attention",
          identity_at_init=False)
def apply(encoder: nn.Module, cfg: VPTConfig) -> list[str]:
    def build(attn: nn.Module) -> nn.Module:
        block = next(b for b in encoder.blocks if b.attn is attn)
        return VPTAttention(attn, block.norm1, cfg.num_tokens, cfg.dropout)

    return replace_modules(encoder, _block_attention, build, "vpt", "the blocks' attention (attn with a qkv Linear)")
