"""Options of ``peft.method=lora`` (samft/peft/lora.py)."""

from __future__ import annotations

from dataclasses import dataclass

from samft.config.field import opt
from samft.config.peft.targets import check_targets
from samft.errors import ConfigError


LORA_INITS = ("default", "pissa", "olora")
LORA_VARIANTS = ("lora", "rslora", "dora")


@dataclass
class LoRAConfig:
    targets: list[str] = opt(["qkv"], "encoder linears to adapt in every block: qkv, proj, lin1, lin2")
    rank: int = opt(3, "rank r of the low-rank update", minimum=1)
    alpha: float = opt(32.0, "scale numerator: the update is multiplied by alpha / rank", minimum=0.0)
    dropout: float = opt(0.0, "dropout on the adapter's input", minimum=0.0)
    init: str = opt("default", "default (A kaiming-uniform, B zero), pissa (A, B from the weight's r principal "
                    "singular components; the residual stays frozen) or olora (A, B from the weight's QR)", LORA_INITS,
                    hash_default=False)
    variant: str = opt("lora", "lora (scale alpha/r), rslora (rank-stabilised: alpha/sqrt(r)) or dora (weight-"
                       "decomposed: a trained magnitude per output times the direction of W + scale B A)",
                       LORA_VARIANTS, hash_default=False)

    def check(self, prefix: str) -> None:
        check_targets(self.targets, prefix)
        if self.dropout >= 1.0:
            raise ConfigError(f"{prefix}.dropout: {self.dropout} must be below 1")
