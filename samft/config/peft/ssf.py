"""Options of ``peft.method=ssf`` (samft/peft/ssf.py)."""

from __future__ import annotations

from dataclasses import dataclass

from samft.config.field import opt
from samft.config.peft.targets import LINEAR_TARGETS, check_choices

NORM_TARGETS = ("norm1", "norm2")
SSF_TARGETS = LINEAR_TARGETS + NORM_TARGETS


@dataclass
class SSFConfig:
    targets: list[str] = opt(list(SSF_TARGETS), "layers followed by scale and shift in every block: "
                             + ", ".join(SSF_TARGETS))

    def check(self, prefix: str) -> None:
        check_choices(self.targets, SSF_TARGETS, f"{prefix}.targets")
