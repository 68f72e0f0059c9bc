"""``bitfit``: only the bias terms of the image encoder train (Ben Zaken et al. 2022).

The biases are those of the encoder's linear, convolution and normalisation layers (every ``nn.Linear``,
``nn.Conv2d``, ``nn.LayerNorm`` and SAM's ``LayerNorm2d`` in the neck) that have one. Nothing is
wrapped, so the trained encoder is a plain SAM encoder: "merging" is a no-op and the export is a plain
SAM checkpoint.
"""

from __future__ import annotations

from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from samft.config.peft.bitfit import BitFitConfig
from samft.peft.inject import unfreeze
from samft.peft.registry import register

BIAS_MODULES = (nn.Linear, nn.Conv2d, nn.LayerNorm, LayerNorm2d)


def encoder_biases(encoder: nn.Module) -> list[str]:
    """Names of the ``bias`` parameters of the encoder's linear, convolution and norm layers."""
    names = []
    for mod_name, module in encoder.named_modules():
        if isinstance(module, BIAS_MODULES) and isinstance(getattr(module, "bias", None), nn.Parameter):
            names.append(f"{mod_name}.bias" if mod_name else "bias")
    return names


@register(
    "bitfit",
    BitFitConfig,
    help="BitFit: only the encoder's bias terms train",
    mergeable=True,
    merge=lambda encoder: 0,
    trains_base=encoder_biases,
)
def apply(encoder: nn.Module, cfg: BitFitConfig) -> list[str]:
    return unfreeze(encoder, encoder_biases(encoder), "bitfit", "linear, convolution or norm layer with a bias")
