"""Options of ``peft.method=adapter`` (samft/peft/adapter.py)."""

from __future__ import annotations

from dataclasses import dataclass

from samft.config.field import opt
from samft.config.peft.targets import check_choices

POSITIONS = ("attn", "mlp")


@dataclass
class AdapterConfig:
    bottleneck: int = opt(8, "hidden width of each adapter (down-projection size)", minimum=1)
    positions: list[str] = opt(["attn", "mlp"], "where in each block: after attn, after mlp, or both")

    def check(self, prefix: str) -> None:
        check_choices(self.positions, POSITIONS, f"{prefix}.positions")
