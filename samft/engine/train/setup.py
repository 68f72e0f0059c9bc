"""Training set-up in parts: :func:`prepare_run` (device, precision, paths, data check, splits) and
:func:`build_training` (model, task, optimizer, schedule, scaler, the module a step calls and its DDP
wrapper, the loss terms with their weights).

``scripts/bench_train.py`` and the tests build a training with these too, so what they measure or check
is what ``samft train`` runs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import samft.peft as peft
from samft.config import Config, absolute_paths
from samft.data.check import check_data, require_clean
from samft.data.layouts import Pair, train_val_pairs
from samft.engine import distributed as D
from samft.engine.runtime import check_compile, compile_blocks, pick_device, resolve_precision
from samft.engine.train.schedule import lr_factor
from samft.engine.train.step import TrainingModule
from samft.errors import ConfigError, SamftError
from samft.model import build_model, count_params
from samft.model.semantic import SemanticSAM
from samft.slip.terms import slip_terms
from samft.tasks.task import Task, make_task
from samft.tasks.terms import LossTerm, model_aux_term


@dataclass
class RunContext:
    """Where and on what a training runs, and the splits it uses."""

    cfg: Config
    info: D.DistInfo
    device: torch.device
    precision: str
    resume: bool
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    show_progress: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.dir or "runs/run")

    @property
    def main(self) -> bool:
        return self.info.is_main


def configure_threads(num_threads: int) -> None:
    """``train.num_threads`` (0 = torch's default) for the intra-op pool."""
    if num_threads:
        torch.set_num_threads(num_threads)


def prepare_run(cfg: Config, resume: bool, info: D.DistInfo, show_progress: bool = True) -> RunContext:
    """Device, precision, seeds, absolute data paths, the data check (before anything is written) and the
    train/validation splits."""
    tc = cfg.train
    device = D.device_for(info, pick_device(tc.device, "train.device"))
    precision = resolve_precision(tc.precision, device)
    configure_threads(tc.num_threads)
    torch.manual_seed(tc.seed)
    if not resume:  # relative paths are stored absolute so the run can be evaluated from anywhere
        absolute_paths(cfg)
    _check_checkpoint(cfg)  # before the data check: a missing checkpoint is said first, with the way round it
    if cfg.data.check != "off":
        _check_data(cfg, info, device, show_progress)
    train_pairs, val_pairs = train_val_pairs(cfg.data)
    return RunContext(cfg, info, device, precision, resume, train_pairs, val_pairs, show_progress)


def _check_checkpoint(cfg: Config) -> None:
    """``model.checkpoint`` names a file that exists; else one line saying how to try the config without one."""
    path = cfg.model.checkpoint
    if path and not Path(path).is_file():
        raise ConfigError(f"model.checkpoint: file not found: {path} (to try this config before the checkpoint "
                          f"arrives, add model.type=tiny model.checkpoint=null: a small random-weight SAM)")


def _check_data(cfg: Config, info: D.DistInfo, device: torch.device, show_progress: bool) -> None:
    report = check_data(cfg, show_progress=show_progress) if info.is_main else None
    if D.broadcast_flag(bool(report and report.problems), info, device):
        if info.is_main:
            require_clean(report)
        raise SamftError("the data check on rank 0 found problems")
    if info.is_main:
        for warning in report.warnings:
            warnings.warn(warning, stacklevel=3)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, eps: float = 1e-8,
                   extra: Iterable[torch.nn.Module] = (), lr_ratio_b: float = 1.0) -> torch.optim.AdamW:
    """AdamW (``train.adam_eps``); matrices and convolution kernels decay, biases/norms/embeddings-of-one-row do not.

    ``extra``: training-only modules (an extra stream's heads) whose parameters train too, after the model's.
    ``lr_ratio_b`` (LoRA+, ``train.lr_ratio_b``): the ``lora_B`` matrices get their own group at ``lr * lr_ratio_b``
    (only when it is not 1, so the groups of earlier runs are unchanged).
    """
    decay, no_decay, lora_b = [], [], []
    for module in (model, *extra):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if lr_ratio_b != 1.0 and name.rsplit(".", 1)[-1] == "lora_B":
                lora_b.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    if lr_ratio_b != 1.0 and not lora_b:
        warnings.warn(f"train.lr_ratio_b={lr_ratio_b} has no effect: the model has no trainable lora_B matrix "
                      f"(LoRA+ applies to peft.method=lora, conv_lora and model.decoder=peft)", stacklevel=2)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": lora_b, "weight_decay": weight_decay, "lr": lr * lr_ratio_b}]
    params = decay + no_decay + lora_b
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps, fused=_fused_adam(params))


def _fused_adam(params: list[torch.Tensor]) -> Optional[bool]:
    """AdamW's fused kernel (one op per parameter instead of a Python loop of ~10: a demo step's optimizer
    update 6 -> 2 ms on a CPU; the same update within float rounding, tested) where every parameter is a
    float tensor on the CPU or a CUDA device; None (PyTorch's default choice) otherwise."""
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return True
    return None


@dataclass
class TrainingParts:
    """Everything one optimizer step needs (see :func:`samft.engine.train.loop.train_step`)."""

    cfg: Config
    model: SemanticSAM
    module: torch.nn.Module  # TrainingModule(model, heads), or its DistributedDataParallel wrapper
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str
    base_sha256: str = ""
    terms: list[LossTerm] = field(default_factory=list)  # the model's auxiliary losses first, then the others

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every named value the terms return (``aux_<name>`` columns, in this order)."""
        weights: dict[str, float] = {}
        for term in self.terms:
            weights.update(term.weights)
        return weights

    @property
    def loss_names(self) -> list[str]:
        """Every auxiliary and extra loss value logged (``aux_<name>`` columns)."""
        return list(self.weights)

    @property
    def extra_modules(self) -> dict[str, nn.Module]:
        """The training-only modules of the terms, by the term's name."""
        return {t.name: t.modules for t in self.terms if isinstance(t.modules, nn.Module)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps: the model's trainable tensors, then those of the terms' modules."""
        modules = [self.model, *self.extra_modules.values()]
        return [p for m in modules for p in m.parameters() if p.requires_grad]


def aux_weights(cfg: Config, task: Task, model: SemanticSAM) -> dict[str, float]:
    """Weight of each auxiliary loss the model produces: ``loss.aux.<name>``, else the task's default."""
    weights = {}
    for name in model.aux_loss_names:
        if not hasattr(cfg.loss.aux, name):
            raise ConfigError(f"loss.aux: the model produces an auxiliary loss {name!r} that has no weight key")
        weights[name] = task.aux_weight(name, getattr(cfg.loss.aux, name))
    return weights


def build_training(cfg: Config, device: torch.device, precision: str, total_steps: int,
                   info: Optional[D.DistInfo] = None, terms: Optional[list[LossTerm]] = None,
                   task: Optional[Task] = None, text_emb: Optional[torch.Tensor] = None) -> TrainingParts:
    """Model (PEFT applied, on ``device``), task, AdamW, warm-up + linear decay, scaler, and the
    :class:`~samft.engine.train.step.TrainingModule` of the model and the terms' training-only modules,
    wrapped in DistributedDataParallel when distributed.

    The loss terms: the model's auxiliary losses (:func:`aux_weights`), those ``cfg`` asks for (SLIP's,
    :func:`samft.slip.terms.slip_terms`), then ``terms`` (a term reading a stream other than the labelled one
    needs that stream in the loop: :func:`samft.engine.train.loop.train`'s ``streams``).

    ``text_emb``: the class-name embeddings of the text class head when resuming (the run's own copy, so
    the run resumes even when ``model.text``'s source has gone); None reads ``model.text``."""
    tc = cfg.train
    info = info or D.DistInfo()
    if tc.compile:
        check_compile(device)
    built = build_model(cfg, text_emb=text_emb)
    model: SemanticSAM = built.model.to(device)
    model.grad_checkpointing = tc.grad_checkpointing
    if tc.compile:
        compile_blocks(model.image_encoder.blocks)
    task = task or make_task(cfg)
    wanted = [model_aux_term(aux_weights(cfg, task, model)), *slip_terms(cfg), *(terms or [])]
    terms = _bind_modules(wanted, model, device, info)
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay, tc.adam_eps,
                               [t.modules for t in terms if t.modules is not None], tc.lr_ratio_b)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, tc.warmup_steps, total_steps, tc.min_lr_ratio, tc.schedule, tc.poly_power))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    module: torch.nn.Module = TrainingModule(model, terms)
    if info.enabled:
        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=peft.get(cfg.peft.method).unused_params)
    return TrainingParts(cfg, model, module, task, optimizer, scheduler, scaler, device, precision,
                         built.base_sha256, terms)


def _bind_modules(terms: list[LossTerm], model: SemanticSAM, device: torch.device, info: D.DistInfo
                  ) -> list[LossTerm]:
    """Build each term's training-only modules for ``model`` (when given as a function), on ``device``,
    in training mode. When distributed their BatchNorm layers are synchronised across processes
    (:func:`samft.slip.ssl.convert_sync_batchnorm`: the statistics of the batch of all processes, on any
    device); they are trained inside the DDP wrapper (:class:`TrainingModule`), so their gradients are
    averaged like the model's."""
    bound = []
    for term in terms:
        modules = term.modules
        if modules is not None and not isinstance(modules, nn.Module):
            modules = modules(model)
        if modules is not None:
            modules = modules.to(device).train()
            if info.enabled:
                modules = _sync_batchnorm(term.name, modules)
        bound.append(replace(term, modules=modules))
    return bound


def _sync_batchnorm(name: str, modules: nn.Module) -> nn.Module:
    """``modules`` with each BatchNorm1d replaced in place by :class:`samft.slip.ssl.DistBatchNorm1d`; other
    BatchNorm kinds are refused (their statistics would be those of one process)."""
    from samft.slip.ssl import DistBatchNorm1d, convert_sync_batchnorm

    if isinstance(modules, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"loss term / data stream {name!r}: its training-only module is a bare BatchNorm layer; "
                          f"wrap it in a module so that it can be synchronised across processes")
    convert_sync_batchnorm(modules)
    for child_name, child in modules.named_modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, DistBatchNorm1d):
            raise ConfigError(f"loss term / data stream {name!r}: {child_name} is a {type(child).__name__}, which "
                              f"cannot be synchronised across processes (only BatchNorm1d is); train in one process")
    return modules


@dataclass(frozen=True)
class Schedule:
    """How many micro-batches and optimizer steps a training has."""

    micro_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, cfg: Config, samples_per_rank: int) -> "Schedule":
        tc = cfg.train
        micro = math.ceil(samples_per_rank / tc.batch_size)
        steps = math.ceil(micro / tc.accum_steps)
        total = tc.epochs * steps
        return cls(micro, min(total, tc.max_steps) if tc.max_steps else total)


def describe_start(ctx: RunContext, parts: TrainingParts, schedule: Schedule) -> str:
    """The one-line summary printed when a training starts."""
    cfg, info = ctx.cfg, ctx.info
    params = count_params(parts.model)
    speed = [f"{cfg.model.attention} attention"] + (["checkpointing"] if cfg.train.grad_checkpointing else []) + (
        ["compiled"] if cfg.train.compile else [])
    procs = f" x {info.world_size} processes" if info.enabled else ""
    from samft.version import __version__
    from samft.config.protocol import summary as protocol_summary

    return (f"[bold]samft {__version__}[/] {cfg.model.type} + {cfg.peft.method}: "
            f"{params['trainable_params']:,} trainable of {params['total_params']:,} parameters | "
            f"{len(ctx.train_pairs)} train / {len(ctx.val_pairs)} val images | {ctx.device}{procs} {ctx.precision}, "
            f"{', '.join(speed)} | {schedule.total_steps} steps | {protocol_summary(cfg)} -> {ctx.run_dir}")
