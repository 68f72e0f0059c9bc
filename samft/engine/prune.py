"""Prune a trained run into a new run directory: load, search, rebuild, fine-tune, write.

``prune_run`` loads a binary-task run (``samft.engine.runs.load_run``: its config, base weights and
adapter), searches an architecture for ``target_gmacs`` on the run's training split, rebuilds the
encoder with plain modules, optionally fine-tunes (the run's PEFT parameters on the remaining attention
blocks, the new conv/BatchNorm parameters and the decoder) and writes a new run directory:

- ``config.yaml``: the source run's resolved config (``output.dir`` pointing at the new directory);
- ``architecture.json``: the architecture description plus what the search found (GMACs dense /
  target / pruned, whether the target was reached, lambda, the source run);
- ``pruned.safetensors``: the whole pruned model's state (the rebuilt encoder is no longer the base
  checkpoint plus an adapter: sliced MLPs and BatchNorm statistics are in it), with the architecture in
  its metadata;
- ``prune.json``: the search history and the validation metrics of the source, of the pruned model
  before fine-tuning and after it.

``load_pruned_run`` rebuilds such a run's model (``build_model`` + :func:`build_pruned_encoder` + a
strict state-dict load). The fine-tuning here is a plain loop (AdamW, the run's lr, no schedule, no
resume); the engine's training loop should take it over (see the report in docs/pruning.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader

from samft.config import dump_yaml
from samft.data.datasets import TrainDataset, collate
from samft.data.layouts import train_val_pairs
from samft.engine.checkpoint import atomic_write_bytes, atomic_write_text
from samft.engine.evaluate import evaluate_pairs
from samft.engine.runs import CONFIG_FILE, LoadedRun, load_run, read_run_config
from samft.model import build_model
from samft.prune.errors import PruneError
from samft.prune.flops import encoder_block_flops, gmacs
from samft.prune.rebuild import build_pruned_encoder, rebuild
from samft.prune.search import binary_task_loss, search
from samft.tasks import make_task

ARCH_FILE = "architecture.json"
PRUNED_FILE = "pruned.safetensors"
REPORT_FILE = "prune.json"


@dataclass
class PruneReport:
    out_dir: Path
    arch: dict[str, Any]
    dense_gmacs: float
    target_gmacs: float
    pruned_gmacs: float
    reached: bool
    metrics: dict[str, dict[str, float]]
    model: torch.nn.Module  # the pruned (and fine-tuned) model, in eval mode


def _out_dir(run_dir: Path, out_dir: Optional[str | Path], overwrite: bool) -> Path:
    out = Path(out_dir) if out_dir else run_dir.parent / f"{run_dir.name}-pruned"
    if out.resolve() == run_dir.resolve():
        raise PruneError(f"{out}: the pruned run needs its own directory, not the source run's")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PruneError(f"{out}: already exists and is not empty (pass overwrite to replace its files)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _loader_fn(dataset: TrainDataset, batch_size: int, seed: int) -> Callable[[], DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    return lambda: DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=gen)


def _validate(loaded: LoadedRun, pairs, device: torch.device, name: str) -> dict[str, float]:
    loaded.model.eval()
    return evaluate_pairs(loaded.model, pairs, loaded.cfg, device, "fp32", name, show_progress=False).compute()


def finetune(model: torch.nn.Module, loader_fn: Callable[[], DataLoader], epochs: int, lr: float,
             device: torch.device) -> list[float]:
    """``epochs`` passes of AdamW on the trainable parameters with the binary task loss; epoch mean losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for batch in loader_fn():
            loss = binary_task_loss(model, batch, device)
            if not math.isfinite(float(loss.detach())):
                raise PruneError(f"prune fine-tuning: the loss became {float(loss.detach())}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(1, count))
    model.eval()
    return losses


def prune_run(run_dir: str | Path, target_gmacs: float, search_steps: Optional[int] = None, finetune_epochs: int = 0,
              out_dir: Optional[str | Path] = None, arch_lr: float = 5e-4, lam: Optional[float] = None,
              device: str | torch.device = "cpu", overwrite: bool = False, search_epochs: Optional[int] = None,
              log: Optional[Callable[[dict], None]] = None) -> PruneReport:
    """Prune the run at ``run_dir`` to ``target_gmacs`` per image and write the pruned run (module doc).

    The search runs ``search_steps`` optimizer steps, or ``search_epochs`` passes over the training split.
    """
    if (search_steps is None) == (search_epochs is None) or (search_steps or search_epochs or 0) < 1:
        raise PruneError(f"prune: give one of search steps ({search_steps}) or search epochs ({search_epochs}), >= 1")
    if target_gmacs <= 0:
        raise PruneError(f"prune: target GMACs {target_gmacs} must be positive")
    run_dir, device = Path(run_dir), torch.device(device)
    loaded = load_run(run_dir, device)
    cfg = loaded.cfg
    task = make_task(cfg)
    if task.kind != "binary":  # the search's loss and the rebuild's checks are written for one mask token
        raise PruneError(f"{run_dir}: pruning supports binary-mask runs for now (this run is multi-class)")
    out = _out_dir(run_dir, out_dir, overwrite)
    train_pairs, val_pairs = train_val_pairs(cfg.data)
    size = loaded.model.img_size
    dataset = TrainDataset(train_pairs, size, cfg.train.hflip, cfg.train.seed)
    loader_fn = _loader_fn(dataset, cfg.train.batch_size, cfg.train.seed)
    if search_steps is None:
        search_steps = search_epochs * math.ceil(len(dataset) / cfg.train.batch_size)
    metric_name = task.selection_metric(cfg.train.metric)
    metrics = {"source": _validate(loaded, val_pairs, device, "source")}
    result = search(loaded.model, loader_fn, target_gmacs, search_steps, arch_lr=arch_lr, lam=lam,
                    lr=cfg.train.lr, device=device, log=log)
    arch = rebuild(loaded.model.image_encoder)
    loaded.model.refresh_aux_modules()
    pruned = gmacs(encoder_block_flops(loaded.model.image_encoder, size)["total"])
    metrics["pruned"] = _validate(loaded, val_pairs, device, "pruned")
    losses = finetune(loaded.model, loader_fn, finetune_epochs, cfg.train.lr, device) if finetune_epochs else []
    if finetune_epochs:
        metrics["finetuned"] = _validate(loaded, val_pairs, device, "finetuned")
    cfg.output.dir = str(out.resolve())
    record = {"source_run": str(run_dir.resolve()), "dense_gmacs": result.dense_gmacs, "target_gmacs": target_gmacs,
              "pruned_gmacs": pruned, "reached": result.reached, "lambda": result.lam, "search_steps": search_steps,
              "arch_lr": arch_lr, "finetune_epochs": finetune_epochs}
    _write(out, loaded, cfg, arch, record, {"history": result.history, "finetune_losses": losses,
                                             "metric": metric_name, "metrics": metrics})
    return PruneReport(out, arch, result.dense_gmacs, target_gmacs, pruned, result.reached, metrics, loaded.model)


def _write(out: Path, loaded: LoadedRun, cfg, arch: dict, record: dict, report: dict) -> None:
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = {"format": "samft-pruned-1", "architecture": json.dumps(arch), "peft_method": cfg.peft.method,
            "sam_type": cfg.model.type, "adapter_meta": json.dumps(loaded.meta)}
    atomic_write_bytes(out / PRUNED_FILE, st_save(state, metadata=meta))
    atomic_write_text(out / ARCH_FILE, json.dumps({**record, "architecture": arch}, indent=1))
    atomic_write_text(out / REPORT_FILE, json.dumps({**record, **report}, indent=1, default=float))
    atomic_write_text(out / CONFIG_FILE, dump_yaml(cfg))


def read_architecture(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The architecture description of a pruned run, or None for a dense run."""
    path = Path(run_dir) / ARCH_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["architecture"]
    except (ValueError, KeyError, TypeError) as e:
        raise PruneError(f"{path}: not a samft architecture file ({e})") from None


def load_pruned_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A pruned run's model: the base model of its config, rebuilt to its architecture, its state loaded."""
    run_dir = Path(run_dir)
    arch = read_architecture(run_dir)
    if arch is None:
        raise PruneError(f"{run_dir}: not a pruned run ({ARCH_FILE} not found)")
    cfg = read_run_config(run_dir)
    built = build_model(cfg)
    build_pruned_encoder(built.model.image_encoder, arch)
    path = run_dir / PRUNED_FILE
    if not path.is_file():
        raise PruneError(f"{path}: the pruned model's state is missing")
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {}) or {}
    try:
        built.model.load_state_dict(st_load(data), strict=True)
    except RuntimeError as e:
        raise PruneError(f"{path}: does not fit the architecture in {ARCH_FILE} ({str(e).splitlines()[0]})") from None
    built.model.refresh_aux_modules()
    return LoadedRun(run_dir, cfg, built.model.to(torch.device(device)).eval(), header)
