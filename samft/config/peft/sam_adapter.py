"""Options of ``peft.method=sam_adapter`` (samft/peft/sam_adapter.py)."""

from __future__ import annotations

from dataclasses import dataclass

from samft.config.field import opt
from samft.errors import ConfigError


@dataclass
class SAMAdapterConfig:
    scale_factor: int = opt(32, "prompt features have width dim // scale_factor", minimum=1)
    freq_ratio: float = opt(0.25, "fraction of the spectrum (centred low-frequency square) masked out", minimum=0.0)
    shared_up: bool = opt(True, "one up-projection shared by all blocks (the reference) instead of one per block")

    def check(self, prefix: str) -> None:
        if self.freq_ratio >= 1.0:
            raise ConfigError(f"{prefix}.freq_ratio: {self.freq_ratio} must be below 1")
