"""``decoder_only``: the image encoder stays frozen; only the mask decoder trains (the baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from samft.peft.registry import register


@dataclass
class DecoderOnlyConfig:
    """No options: the encoder is left as it is."""


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
