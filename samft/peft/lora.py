"""``lora``: low-rank adapters ``h = W0 x + (alpha / r) B A x`` on chosen encoder linears (Hu et al. 2021).

Options beyond the rank (``peft.lora``):

- ``variant=rslora`` (Kalajdzievski 2023): the scale is ``alpha / sqrt(r)``.
- ``variant=dora`` (Liu et al., ICML 2024): ``h = m / ||W0 + s B A||_row * (W0 + s B A) x + b`` with a trained
  magnitude ``m`` (one per output, starting at the row norms of ``W0``) and the norm detached from the graph, as
  the paper and HF peft do (tested equal to peft's DoRA).
- ``init=pissa`` (Meng et al. 2024): with ``W0 = U S V^T``, ``B = U_r sqrt(S_r / s)`` and ``A = sqrt(S_r / s) V_r^T``
  hold the r principal components and the frozen base keeps the residual ``W0 - s B A``: the layer starts as
  the frozen one, the adapter on the weight's principal subspace. ``init=olora`` (Büyükakyüz 2024): the same
  with ``W0 = Q R``, ``B = Q_r``, ``A = R_r``. The residual depends only on the subspace (not on the signs an SVD
  picks), so a rebuilt model gets it back; merging gives ``residual + s B A``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from samft.config.peft.lora import LoRAConfig
from samft.peft.inject import AdapterLayer, linear_targets, merge_layers, replace_modules
from samft.peft.quantize import dense_weight, float_like
from samft.peft.registry import register


def init_low_rank(in_features: int, out_features: int, rank: int, like: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """``A`` (r x in) kaiming-uniform as nn.Linear, ``B`` (out x r) zero: the update starts at zero."""
    a = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
    return a, b


def lora_scaling(alpha: float, rank: int, variant: str = "lora") -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if variant == "rslora" else alpha / rank


def principal_init(weight: torch.Tensor, rank: int, scaling: float, init: str) -> tuple[torch.Tensor, ...]:
    """(A, B, residual) of PiSSA (SVD) or OLoRA (QR) for a (out, in) weight, computed in float64:
    ``residual + scaling * B @ A == weight``."""
    w = weight.detach().double()
    if init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = (s[:rank] / scaling).sqrt()
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root
    else:  # olora
        q, r = torch.linalg.qr(w)
        a, b = r[:rank], q[:, :rank]
    residual = w - scaling * b @ a
    return tuple(t.to(weight.dtype) for t in (a, b, residual))


class LoRALinear(AdapterLayer):
    """``nn.Linear`` + low-rank update (DoRA: and a magnitude per output). Shapes: x (..., in) -> (..., out)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, init: str = "default",
                 variant: str = "lora") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = lora_scaling(alpha, rank, variant)
        self.lora_A, self.lora_B = init_low_rank(base_layer.in_features, base_layer.out_features, rank,
                                                 float_like(base_layer))
        if init != "default":
            a, b, residual = principal_init(base_layer.weight, rank, self.scaling, init)
            with torch.no_grad():
                self.lora_A.copy_(a)
                self.lora_B.copy_(b)
                base_layer.weight.copy_(residual)
        self.magnitude = nn.Parameter(self.adapted_weight().detach().norm(dim=1)) if variant == "dora" else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapted_weight(self) -> torch.Tensor:
        """``W0 + s B A`` (out, in); a quantised ``W0`` (model.quantize) de-quantised."""
        return dense_weight(self.base_layer) + (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = self.dropout(x)
        update = F.linear(F.linear(dropped, self.lora_A), self.lora_B)
        base = self.base_layer(x)
        if self.magnitude is None:
            return base + update * self.scaling
        return self._dora(dropped, base, update)

    def _dora(self, dropped: torch.Tensor, base: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``W0 x + b + (m / n - 1) W0 x + m / n * s B A x`` with ``n = ||W0 + s B A||`` per output, detached: in eval
        (or without dropout) ``m / n * (W0 + s B A) x + b``; with dropout in training the magnitude term sees the
        dropped input, as peft computes it."""
        factor = self.magnitude / self.adapted_weight().detach().norm(dim=1)
        if self.training and isinstance(self.dropout, nn.Dropout):
            plain = F.linear(dropped, dense_weight(self.base_layer))
        else:
            bias = self.base_layer.bias
            plain = base - bias if bias is not None else base
        return base + (factor - 1) * plain + factor * update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W0 + s B A`` (DoRA: scaled to the magnitude per output row; equal output in
        eval mode; a quantised ``W0`` de-quantised)."""
        base = self.base_layer
        like = float_like(base)
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=like.device,
                        dtype=like.dtype)
        with torch.no_grad():
            weight = self.adapted_weight()
            if self.magnitude is not None:
                weight = weight * (self.magnitude / weight.norm(dim=1))[:, None]
            out.weight.copy_(weight)
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
        lambda m: LoRALinear(m, cfg.rank, cfg.alpha, cfg.dropout, cfg.init, cfg.variant),
        "lora",
        f"targets {cfg.targets}",
    )
