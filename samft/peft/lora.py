"""``lora``: low-rank adapters ``h = W0 x + (alpha / r) B A x`` on chosen encoder linears (Hu et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from samft.config.peft.lora import LoRAConfig
from samft.peft.inject import AdapterLayer, linear_targets, merge_layers, replace_modules
from samft.peft.registry import register


def init_low_rank(in_features: int, out_features: int, rank: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """``A`` (r x in) kaiming-uniform as nn.Linear, ``B`` (out x r) zero: the update starts at zero."""
    a = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
    return a, b


class LoRALinear(AdapterLayer):
    """``nn.Linear`` + low-rank update. Shapes: x (..., in) -> (..., out)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A, self.lora_B = init_low_rank(base_layer.in_features, base_layer.out_features, rank,
                                                 base_layer.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base_layer(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W0 + (alpha/r) B A`` (equal output in eval mode)."""
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + (self.lora_B @ self.lora_A) * self.scaling)
            if base.bias is not None:
                out.bias.copy_(base.bias)
        out.requires_grad_(False)
        return out


def merge(encoder: nn.Module) -> int:
    """Fold every LoRALinear into a plain nn.Linear; returns how many were merged."""
    return merge_layers(encoder, LoRALinear)


@register("lora", LoRAConfig, help="low-rank adapters on encoder linears (mergeable)", mergeable=True, merge=merge)
def apply(encoder: nn.Module, cfg: LoRAConfig) -> list[str]:
    return replace_modules(
        encoder,
        linear_targets(cfg.targets),
        lambda m: LoRALinear(m, cfg.rank, cfg.alpha, cfg.dropout),
        "lora",
        f"targets {cfg.targets}",
    )
