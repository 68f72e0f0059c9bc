"""``ssf``: Scaling and Shifting your Features (Lian et al., NeurIPS 2022).

After each targeted layer of every encoder block a learnable per-channel scale and shift:
``y = gamma * f(x) + beta`` with ``gamma = 1`` and ``beta = 0`` at the start (so the model starts as the
frozen one). Targets are the block linears (``qkv``, ``proj``, ``lin1``, ``lin2``) and layer norms
(``norm1``, ``norm2``). SSF is linear in the layer's output, so it merges: a Linear becomes
``W' = diag(gamma) W``, ``b' = gamma * b + beta``; a LayerNorm's affine weight and bias the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from samft.config.peft.ssf import NORM_TARGETS, SSF_TARGETS, SSFConfig  # noqa: F401  (SSF_TARGETS re-exported)
from samft.errors import ConfigError
from samft.peft.inject import (LINEAR_TARGETS, AdapterLayer, linear_targets, merge_layers,
                               replace_modules)
from samft.peft.registry import register

class SSFLayer(AdapterLayer):
    """``gamma * base(x) + beta`` over the last (channel) dimension. Shapes: (..., C) -> (..., C)."""

    def __init__(self, base_layer: nn.Module, channels: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        like = base_layer.weight
        self.scale = nn.Parameter(torch.ones(channels, device=like.device, dtype=like.dtype))
        self.shift = nn.Parameter(torch.zeros(channels, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.scale + self.shift

    def merged(self) -> nn.Module:
        """The base layer with gamma and beta folded into its weight and bias (equal output)."""
        base = self.base_layer
        with torch.no_grad():
            weight = base.weight * (self.scale[:, None] if base.weight.dim() == 2 else self.scale)
            bias = self.shift.clone() if base.bias is None else base.bias * self.scale + self.shift
            base.weight.copy_(weight)
            if base.bias is None:
                base.bias = nn.Parameter(bias, requires_grad=False)
            else:
                base.bias.copy_(bias)
        return base


def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or len(module.normalized_shape) != 1:
            raise ConfigError("PEFT method ssf: a targeted LayerNorm has no per-channel affine weight to merge into")
        return module.normalized_shape[0]
    raise ConfigError(f"PEFT method ssf: cannot scale and shift a {type(module).__name__}")


def _match(targets: list[str]):
    linears = linear_targets([t for t in targets if t in LINEAR_TARGETS])
    norms = {t for t in targets if t in NORM_TARGETS}

    def match(name: str, module: nn.Module) -> bool:
        if linears(name, module):
            return True
        return (isinstance(module, nn.LayerNorm) and name.startswith("blocks.")
                and name.rsplit(".", 1)[-1] in norms)

    return match


def merge(encoder: nn.Module) -> int:
    """Fold every SSFLayer into the layer it follows; returns how many were merged."""
    return merge_layers(encoder, SSFLayer)


@register("ssf", SSFConfig, help="SSF: learnable scale and shift after the block linears and norms",
          mergeable=True, merge=merge)
def apply(encoder: nn.Module, cfg: SSFConfig) -> list[str]:
    return replace_modules(encoder, _match(cfg.targets), lambda m: SSFLayer(m, _channels(m)), "ssf",
                           f"targets {cfg.targets}")
