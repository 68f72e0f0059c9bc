"""Options of ``peft.method=vpt`` (samft/peft/vpt.py)."""

from __future__ import annotations

from dataclasses import dataclass

from samft.config.field import opt
from samft.errors import ConfigError


@dataclass
class VPTConfig:
    num_tokens: int = opt(10, "learnable prompt tokens per block (extra keys/values of every window)", minimum=1)
    dropout: float = opt(0.0, "dropout on the prompt tokens in training", minimum=0.0)

    def check(self, prefix: str) -> None:
        if self.dropout >= 1.0:
            raise ConfigError(f"{prefix}.dropout: {self.dropout} must be below 1")
