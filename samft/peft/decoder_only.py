"""``decoder_only``: the image encoder stays frozen; only the mask decoder trains (the baseline)."""

from __future__ import annotations

from torch import nn

from samft.config.peft.decoder_only import DecoderOnlyConfig
from samft.peft.registry import register


@register(
    "decoder_only",
    DecoderOnlyConfig,
    help="encoder frozen, only the mask decoder trains",
    mergeable=True,
    merge=lambda encoder: 0,
    adapts_encoder=False,
)
def apply(encoder: nn.Module, cfg: DecoderOnlyConfig) -> list[str]:
    return []
