"""``full``: full fine-tuning, every parameter of the image encoder trains (the upper baseline).

Nothing is wrapped: the encoder is SAM's own, so it is trivially "merged" and exports as a plain SAM
checkpoint. The adapter file then holds the whole encoder (and the decoder).
"""

from __future__ import annotations

from torch import nn

from samft.config.peft.full import FullConfig
from samft.peft.inject import unfreeze
from samft.peft.registry import register


def encoder_params(encoder: nn.Module) -> list[str]:
    """Every parameter of the encoder (what full fine-tuning trains)."""
    return [name for name, _ in encoder.named_parameters()]


@register(
    "full",
    FullConfig,
    help="full fine-tuning: the whole image encoder trains (upper baseline)",
    mergeable=True,
    merge=lambda encoder: 0,
    trains_base=encoder_params,
)
def apply(encoder: nn.Module, cfg: FullConfig) -> list[str]:
    return unfreeze(encoder, encoder_params(encoder), "full", "parameters")
