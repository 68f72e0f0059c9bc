"""Options of ``peft.method=conv_lora`` (samft/peft/conv_lora.py)."""

from __future__ import annotations

from dataclasses import dataclass

from samft.config.field import opt
from samft.config.peft.lora import LoRAConfig
from samft.errors import ConfigError


@dataclass
class ConvLoRAConfig(LoRAConfig):
    """LoRA's options (targets, rank r of the feature z, alpha, dropout) plus the mixture of experts."""

    experts: int = opt(8, "number of convolutional experts", minimum=1)
    scales: list[float] = opt([], "upsampling factor of each expert (empty = 1, 2, ..., experts)")
    top_k: int = opt(1, "experts chosen per sample by the gate", minimum=1)
    gate_scales_output: bool = opt(False, "multiply expert outputs by their gate (the reference does not)")
    noisy_gating: bool = opt(True, "add learned Gaussian noise to the gate logits in training")
    noise_eps: float = opt(1e-2, "minimum standard deviation of the gate noise", minimum=0.0)
    balance_coef: float = opt(1e-2, "coefficient of the per-layer expert balance loss", minimum=0.0)
    impl: str = opt("grouped", "grouped (fast: plain sum, grouped dispatch) or reference (AutoGluon's exp/log "
                    "SparseDispatcher path, a benchmark baseline; overflows in fp16)", ("grouped", "reference"))

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.variant == "dora":
            raise ConfigError(f"{prefix}.variant: dora needs the adapted weight W + scale B A, but Conv-LoRA's branch "
                              f"(experts between A and B) is not a weight; use lora or rslora")
        if self.init != "default":
            raise ConfigError(f"{prefix}.init: {self.init} starts B non-zero, and Conv-LoRA's experts (non-linear, "
                              f"between A and B) would then change the output at the start: no residual makes it "
                              f"the frozen layer; use init=default")
        if self.scales and len(self.scales) != self.experts:
            raise ConfigError(f"{prefix}.scales: {len(self.scales)} scales for {self.experts} experts")
        if any(s <= 0 for s in self.scales):
            raise ConfigError(f"{prefix}.scales: {self.scales} must all be positive")
        if self.top_k > self.experts:
            raise ConfigError(f"{prefix}.top_k: {self.top_k} is more than the {self.experts} experts")
        if self.impl == "reference" and self.top_k != 1:
            raise ConfigError(f"{prefix}.impl: reference restates AutoGluon's top-1 path (its exp/log combine is "
                              f"a log-sum-exp for top_k > 1); use impl=grouped with top_k={self.top_k}")

    def expert_scales(self) -> list[float]:
        return list(self.scales) if self.scales else [float(i) for i in range(1, self.experts + 1)]
