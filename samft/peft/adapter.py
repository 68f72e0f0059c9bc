"""``adapter``: Houlsby bottleneck adapters (Houlsby et al. 2019).

In every encoder block an adapter follows the attention (after its output projection, before the
residual sum) and another follows the MLP: ``h + up(GELU(down(h)))`` with ``down`` (dim -> bottleneck)
and ``up`` (bottleneck -> dim). ``up`` starts at zero, so a fresh adapter is the identity and the model
starts as the frozen one. SAM's windowed blocks call the attention on (B * windows, ws, ws, C) tensors;
the adapter acts per token, so windows make no difference. Houlsby et al. also train the layer norms;
here only the adapters train (with the mask decoder). Not mergeable: the GELU makes it non-linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samft.config.peft.adapter import AdapterConfig
from samft.errors import ConfigError
from samft.peft.inject import AdapterLayer, replace_modules
from samft.peft.registry import register

class BottleneckAdapter(AdapterLayer):
    """``y = f(x)``, then ``y + up(GELU(down(y)))`` on the last dimension. Shapes: (..., dim) -> (..., dim)."""

    def __init__(self, base_layer: nn.Module, dim: int, bottleneck: int, like: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.down = nn.Linear(dim, bottleneck, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(bottleneck, dim, device=like.device, dtype=like.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.up(F.gelu(self.down(y)))


def _block_part(positions: list[str]):
    wanted = set(positions)

    def match(name: str, module: nn.Module) -> bool:
        parts = name.split(".")
        return len(parts) == 3 and parts[0] == "blocks" and parts[2] in wanted

    return match


def _output_dim(module: nn.Module) -> tuple[int, torch.Tensor]:
    """Width and a reference weight of SAM's Attention (``proj``) or MLPBlock (``lin2``)."""
    last = getattr(module, "proj", None)
    if last is None:
        last = getattr(module, "lin2", None)
    if not isinstance(last, nn.Linear):
        raise ConfigError(f"PEFT method adapter: cannot find the output Linear of {type(module).__name__}")
    return last.out_features, last.weight


@register("adapter", AdapterConfig, help="Houlsby bottleneck adapters after every block's attention and MLP")
def apply(encoder: nn.Module, cfg: AdapterConfig) -> list[str]:
    def build(module: nn.Module) -> nn.Module:
        dim, like = _output_dim(module)
        return BottleneckAdapter(module, dim, cfg.bottleneck, like)

    return replace_modules(encoder, _block_part(cfg.positions), build, "adapter", f"block parts {cfg.positions}")
