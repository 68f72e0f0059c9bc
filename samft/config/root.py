"""The whole config: one field per section, resolved against its protocol when built, and validated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samft.config.checks import check_fields
from samft.config.data import DataConfig
from samft.config.eval import EvalConfig, OutputConfig
from samft.config.field import opt, section
from samft.config.loss import LossConfig
from samft.config.model import ModelConfig, check_family_method, check_quantize
from samft.config.peft import PeftConfig, trains_encoder
from samft.errors import ConfigError
from samft.config.protocol import PROTOCOLS, apply_protocol
from samft.config.slip import check_slip
from samft.config.train import TrainConfig


@dataclass
class Config:
    protocol: str = opt("samft", "samft or autogluon (the reference implementation): the value of every option left "
                                 "null that the two treat differently (see samft/config/protocol.py and the README's "
                                 "'Reproducing the paper')", PROTOCOLS)
    model: ModelConfig = section(ModelConfig, "SAM size, checkpoint and input size")
    peft: PeftConfig = section(PeftConfig, "parameter-efficient fine-tuning method and its options")
    data: DataConfig = section(DataConfig, "dataset layout and splits")
    train: TrainConfig = section(TrainConfig, "optimisation and schedule")
    loss: LossConfig = section(LossConfig, "loss terms")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    output: OutputConfig = section(OutputConfig, "where the run is written")

    def __post_init__(self) -> None:
        apply_protocol(self)  # every Config is resolved, however it was built

    @property
    def method_cfg(self) -> Any:
        """The options section of the active PEFT method."""
        return self.peft.options

    def check(self) -> None:
        """The rules that tie fields together, each section's own first, then SLIP's across sections."""
        self.model.check("model")
        self.loss.set.check("loss.set")
        self.data.validate("data")
        self.train.check("train", multiclass=bool(self.data.classes))
        self.peft.check("peft")
        check_family_method(self.model, self.peft.method)
        check_quantize(self.model, self.peft.method, getattr(self.method_cfg, "init", "default"), self.peft.hf.type)
        if self.model.decoder == "frozen" and not trains_encoder(self.peft.method) and not self.data.classes:
            raise ConfigError(f"model.decoder: frozen with peft.method={self.peft.method} trains nothing (a binary "
                              f"model has no class head); use model.decoder=peft or full, or another peft.method")
        self.output.check("output")
        check_slip(self)


def validate(cfg: Config) -> Config:
    """Check choices, minimums and the rules that tie fields together."""
    check_fields(cfg)
    cfg.check()
    return cfg
