"""The ``train`` section: optimisation, schedule, precision and logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from samft.config.checks import check_choice
from samft.config.field import opt
from samft.config.metric_names import METRIC_CHOICES, canonical, task_metric_names
from samft.errors import ConfigError

LOGGERS = ("csv", "tensorboard", "mlflow")  # csv (metrics.csv) is always written: the run's own record


@dataclass
class TrainConfig:
    epochs: int = opt(20, "number of passes over the training split", minimum=1, resumable=True)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = run all epochs)", minimum=0, resumable=True)
    batch_size: Optional[int] = opt(None, "images per forward pass (per process); null = the protocol's (samft 4, "
                                          "autogluon 1)", minimum=1)
    accum_steps: Optional[int] = opt(None, "forward passes accumulated per optimizer step; null = the protocol's "
                                           "(samft 1, autogluon 4)", minimum=1)
    lr: float = opt(1e-4, "peak AdamW learning rate", minimum=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", minimum=0.0)
    lr_ratio_b: float = opt(1.0, "LoRA+ (Hayou et al. 2024): the learning rate of the LoRA/Conv-LoRA B matrices "
                            "(lora_B) is lr times this (LoRA+ suggests 16)", minimum=0.0, hash_default=False)
    adam_eps: Optional[float] = opt(None, "AdamW eps; null = the protocol's (samft 1e-8, PyTorch's default; "
                                          "autogluon 1e-6)", minimum=0.0)
    schedule: Optional[str] = opt(None, "learning-rate decay after the warm-up: linear (to min_lr_ratio) or poly "
                                        "((1 - t)^poly_power, AutoGluon's polynomial_decay); null = the protocol's",
                                  ("linear", "poly"))
    poly_power: float = opt(1.0, "power of the poly schedule (AutoGluon: 1, the same curve as linear)", minimum=0.0)
    warmup_steps: int = opt(0, "linear warm-up steps before the linear decay", minimum=0)
    min_lr_ratio: float = opt(0.0, "learning rate at the end of the linear decay, as a fraction of lr", minimum=0.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)", minimum=0.0)
    precision: str = opt("auto", "auto (bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU), bf16, fp16 "
                         "(with GradScaler) or fp32",
                         ("auto", "bf16", "fp16", "fp32"))
    compile: bool = opt(False, "torch.compile each encoder block (slow first steps; needs a C++ compiler on CPU "
                        "or Triton on CUDA)")
    grad_checkpointing: bool = opt(False, "recompute each encoder block's activations in the backward pass "
                                   "(non-reentrant checkpointing): much less memory, about 1/3 more time")
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N", resumable=True)
    seed: int = opt(42, "seed of weights init, data order, augmentation and gate noise")
    metric: str = opt("auto", "validation metric that picks the best checkpoint (auto = Sm for binary, mIoU for "
                              "multi-class): an eval.json name (Sm, dice@0.5, meanDice, mIoU, ...) or its alias "
                              "(sm, dice, mdice, em, wfm, mae, ber, miou, ...); dice, iou and BER are taken at "
                              "eval.threshold (named dice@0.3 at 0.3)", ("auto",) + METRIC_CHOICES)
    patience: int = opt(0, "early stopping: stop when the metric has not improved for this many validations in a "
                           "row (0 = off; a tie is no improvement)", minimum=0, resumable=True)
    val_every: int = opt(1, "validate every N epochs (the last epoch is always validated)", minimum=1, resumable=True)
    save_every: int = opt(100, "also save the resumable state every N optimizer steps (0 = epoch ends only)",
                          minimum=0, resumable=True)
    log_every: int = opt(10, "write a metrics.csv row every N optimizer steps", minimum=1, resumable=True)
    hflip: float = opt(0.5, "probability of the random horizontal flip", minimum=0.0)
    num_threads: int = opt(0, "CPU threads for torch (0 = torch's default: all cores; 1 = the safest on a machine "
                              "others share, see docs/performance.md)", minimum=0, resumable=True)
    progress: bool = opt(True, "show a progress bar", resumable=True)
    loggers: list[str] = opt(["csv"], "where the metrics go besides metrics.csv (always written, listed or not): "
                                      "tensorboard (RUN/tensorboard/) and/or mlflow (train.mlflow_uri), each "
                                      "with the same names and steps as metrics.csv", resumable=True)
    log_images_every: int = opt(1, "every N validations, send a few validation images with their true and "
                                   "predicted masks to the tensorboard/mlflow loggers (0 = never)", minimum=0,
                                resumable=True)
    mlflow_uri: Optional[str] = opt(None, "MLflow tracking URI; null = a local SQLite store beside the runs "
                                          "(sqlite:///<output.dir's parent>/mlflow.db, artifacts in mlartifacts/ "
                                          "there); nothing reaches a network unless a server URI is given here",
                                    resumable=True)
    mlflow_experiment: str = opt("samft", "MLflow experiment the run is logged under (created when absent)",
                                 resumable=True)

    def check(self, prefix: str, multiclass: bool) -> None:
        """``metric`` must be a metric of the task (binary or multi-class, from data.classes); each of
        ``loggers`` a known logger, once."""
        for i, name in enumerate(self.loggers):
            check_choice(name, LOGGERS, f"{prefix}.loggers[{i}]")
            if name in self.loggers[:i]:
                raise ConfigError(f"{prefix}.loggers: {name!r} is listed twice")
        if self.mlflow_uri is not None and not self.mlflow_uri.strip():
            raise ConfigError(f"{prefix}.mlflow_uri: empty; give a tracking URI, or null for the local store")
        if not self.mlflow_experiment.strip():
            raise ConfigError(f"{prefix}.mlflow_experiment: empty; give an experiment name")
        if self.metric != "auto" and canonical(self.metric) not in task_metric_names(multiclass):
            kind = "multi-class" if multiclass else "binary"
            raise ConfigError(f"{prefix}.metric: {self.metric!r} is not a {kind} metric; choose from "
                              f"{', '.join(task_metric_names(multiclass))}")
