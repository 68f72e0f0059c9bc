"""Prune a trained run into a new run directory: load, search, rebuild, fine-tune, write.

``prune_run`` loads a binary-task run (``samft.engine.artifacts.loading.load_run``), searches an architecture for
``target_gmacs`` on the run's training split, rebuilds the encoder with plain modules and writes a new
run directory that every command reads like any other run (``eval``, ``predict``, ``export``, ``info``,
``Segmenter.from_run``):

- ``pruned.safetensors``: the whole pruned model's state right after the search (sliced MLPs, derived
  convolutions and their BatchNorm statistics), the architecture in its metadata (:mod:`samft.prune.state`);
- ``config.yaml``: the source run's config with ``model.pruned`` naming that file, relative to the run
  (``pruned.safetensors``: a moved or copied run reads its own; so ``build_model``
  rebuilds the pruned model as the run's base), ``output.dir`` the new directory, ``train.epochs`` the
  fine-tuning epochs;
- ``architecture.json``: the architecture description plus what the search found (GMACs dense /
  target / pruned, whether the target was reached (always, by the gates' order: :mod:`samft.prune.order`),
  the GMACs the thresholds alone fixed, lambda, the source run);
- the fine-tuning is the normal training loop (:func:`samft.engine.train.loop.train`) on that config: the
  run's PEFT parameters on the remaining attention blocks, the new conv/BatchNorm parameters and the
  decoder; it writes ``adapter.safetensors`` (best), ``adapter_last.safetensors``, ``state.pt``,
  ``metrics.csv`` as any run, and resumes like one. Without fine-tuning, ``adapter.safetensors`` holds
  the pruned model's trainable parameters;
- ``prune.json``: the search history and the validation metrics of the source, of the pruned model
  before fine-tuning and after it.

The search saves its state (``search_state.pt``, :mod:`samft.prune.search_state`) every
``search_save_every`` steps; ``resume`` continues it (same source run and settings), or the fine-tuning
of a directory whose search finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader

from samft.config import Config, config_from_dict, dump_yaml
from samft.data.datasets import TrainDataset, collate
from samft.data.layouts import train_val_pairs
from samft.engine.artifacts.fileio import atomic_torch_save, atomic_write_bytes
from samft.engine.artifacts.adapter import save_adapter, adapter_expectations
from samft.engine.infer.evaluate import evaluate_pairs
from samft.engine.artifacts import prune_files
from samft.engine.artifacts.rundir import ADAPTER_FILE, ARCH_FILE, CONFIG_FILE, MARKER_FILE, PRUNED_FILE, RunDir
from samft.engine.artifacts.loading import LoadedRun, load_run, locate_pruned
from samft.errors import SamftError
from samft.model import build_model
from samft.prune.errors import PruneError
from samft.engine.runtime import pick_device
from samft.prune.flops import encoder_block_flops, gmacs
from samft.prune.order import check_reachable
from samft.prune.rebuild import rebuild
from samft.prune.search import search
from samft.prune.search_state import SearchCheckpoint
from samft.prune.state import PRUNED_FORMAT, read_pruned
from samft.tasks.task import make_task

REPORT_FILE = "prune.json"
SEARCH_STATE_FILE = "search_state.pt"  # the search's resumable state, removed once the pruned run is written
__all__ = ["ARCH_FILE", "PRUNED_FILE", "REPORT_FILE", "PruneArgs", "PruneReport", "load_pruned_run", "prune_run",
           "read_architecture"]


@dataclass
class PruneArgs:
    """What ``samft prune`` asks for (built by the CLI; usable from Python): prune ``run_dir`` to
    ``target_gmacs`` encoder GMACs per image into ``out_dir`` (default RUN-pruned).

    The search runs ``search_steps`` optimizer steps, or ``search_epochs`` passes over the training split
    (exactly one of the two), with the gate thresholds' learning rate ``arch_lr`` and the FLOPs-loss weight
    ``lam`` (None: samft's rule, the FLOPs loss starting at 1.1 x the task loss; the authors fix lambda per
    model in their configs); ``finetune_epochs`` epochs of the normal training loop follow
    (``overrides``: ``key=value`` for the pruned run's config, e.g. ``train.lr=1e-4``). The search saves its
    state every ``search_save_every`` steps (``OUT/search_state.pt``). ``resume`` with ``out_dir``: continues
    the search from that state (same source run and settings required), or the fine-tuning of a run whose
    search finished (``run_dir`` and ``target_gmacs`` are then not needed). ``log``: called with each
    search step's record."""

    run_dir: Optional[str | Path] = None
    target_gmacs: Optional[float] = None
    search_steps: Optional[int] = None
    search_epochs: Optional[int] = None
    finetune_epochs: int = 0
    out_dir: Optional[str | Path] = None
    arch_lr: float = 5e-4
    lam: Optional[float] = None
    device: str | torch.device = "auto"
    overwrite: bool = False
    overrides: Optional[list[str]] = None
    resume: bool = False
    show_progress: bool = False
    search_save_every: int = 100
    log: Optional[Callable[[dict], None]] = None


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
    search_gmacs: Optional[float] = None  # what the thresholds alone fixed, before the gates' order met the target


def _out_path(run_dir: Path, out_dir: Optional[str | Path]) -> Path:
    out = Path(out_dir) if out_dir else run_dir.parent / f"{run_dir.name}-pruned"
    if out.resolve() == run_dir.resolve():
        raise PruneError(f"{out}: the pruned run needs its own directory, not the source run's")
    return out


def _claim_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Claim OUT by the one rule of :meth:`RunDir.claim` (a folder samft did not create is refused whatever
    ``overwrite`` says; a run samft made needs ``overwrite``), then mark it samft's. A saved search there is
    continued with ``resume`` only (:func:`_check_resumable` ran before), or dropped with ``overwrite``."""
    run = RunDir(out)
    if not resume:
        run.claim(overwrite, option="--out", to_overwrite="pass --overwrite")
        if (out / SEARCH_STATE_FILE).is_file() and not overwrite:
            raise PruneError(f"{out}: holds an interrupted search ({SEARCH_STATE_FILE}); continue it with --resume "
                             f"{out} (same source run and search options), or pass --overwrite to search again")
    run.mark()


_SEARCH_FILES = {SEARCH_STATE_FILE, CONFIG_FILE, ARCH_FILE, REPORT_FILE}  # a pruned run whose search is not done


def _check_resumable(out: Path) -> None:
    """``resume`` needs a pruned run samft made at OUT: a finished one (``pruned.safetensors`` and
    ``architecture.json`` in a run samft created) or one whose search was interrupted (samft's marker, or an
    earlier version's lone ``search_state.pt``, and nothing a training or a user wrote). Refused in one
    line otherwise, before anything is written."""
    run = RunDir(out)
    files = set(run.user_files()) if out.is_dir() else set()
    if (out / PRUNED_FILE).is_file():
        ok = run.is_samft_run() and (out / ARCH_FILE).is_file()
    else:
        marked = run.file(MARKER_FILE).is_file() or files == {SEARCH_STATE_FILE}
        ok = out.is_dir() and files <= _SEARCH_FILES and marked
    if not ok:
        shown = ", ".join(sorted(files)[:3]) or "nothing"
        raise PruneError(f"prune --resume {out}: not a pruned run samft made (it holds {shown}); nothing was "
                         f"written. Start a pruning with --out NEW_DIR")


def _check_options(args: PruneArgs) -> None:
    """Numbers that mean nothing (NaN, infinite, negative, zero where a positive value is needed) are refused
    in one line naming the option."""
    for option, value, lo in (("--target-gmacs", args.target_gmacs, 0.0), ("--arch-lr", args.arch_lr, 0.0),
                              ("--lambda", args.lam, 0.0)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > lo):
            raise PruneError(f"prune {option} {value!r}: expected a finite number > 0")
    for option, value, lo in (("--search-steps", args.search_steps, 1), ("--search-epochs", args.search_epochs, 1),
                              ("--finetune-epochs", args.finetune_epochs, 0),
                              ("--search-save-every", args.search_save_every, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lo):
            raise PruneError(f"prune {option} {value!r}: expected a whole number >= {lo}")


def _loader_fn(dataset: TrainDataset, batch_size: int, seed: int) -> Callable[[], DataLoader]:
    gen = torch.Generator().manual_seed(seed)
    return lambda: DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=gen)


def _validate(loaded: LoadedRun, pairs, device: torch.device, name: str) -> dict[str, float]:
    loaded.model.eval()
    return evaluate_pairs(loaded.model, pairs, loaded.cfg, device, "fp32", name, show_progress=False).compute()


def pruned_config(cfg: Config, out: Path, finetune_epochs: int, device: torch.device,
                  overrides: Optional[list[str]] = None) -> Config:
    """The pruned run's config: the source's with ``model.pruned`` = OUT/pruned.safetensors, ``output.dir``
    = OUT, the fine-tuning's epochs (no ``max_steps`` cap) and device, then the user's ``key=value``.
    In memory the path is absolute (the training builds the model from it); ``config.yaml`` stores it
    relative to the run (:func:`samft.engine.artifacts.run_config.write`), so the run can be moved."""
    data = yaml.safe_load(dump_yaml(cfg))
    data["model"]["pruned"] = str((out / PRUNED_FILE).resolve())
    data["output"].update({"dir": str(out.resolve()), "overwrite": False})
    if finetune_epochs:
        data["train"].update({"epochs": finetune_epochs, "max_steps": 0})
    data["train"]["device"] = str(device)
    try:
        return config_from_dict(data, overrides)
    except SamftError as e:
        raise PruneError(f"prune: the pruned run's config: {e}") from None


def _search_phase(loaded: LoadedRun, args: PruneArgs, device: torch.device,
                  checkpoint: SearchCheckpoint) -> tuple[dict, dict, dict]:
    """Search (resumable from ``checkpoint``), rebuild, validate before/after: (architecture, record for
    architecture.json, report)."""
    cfg = loaded.cfg
    target_gmacs, arch_lr, lam = args.target_gmacs, args.arch_lr, args.lam
    train_pairs, val_pairs = train_val_pairs(cfg.data)
    size = loaded.model.img_size
    dataset = TrainDataset(train_pairs, size, cfg.train.hflip, cfg.train.seed)
    loader_fn = _loader_fn(dataset, cfg.train.batch_size, cfg.train.seed)
    steps = args.search_steps
    if steps is None:
        steps = args.search_epochs * math.ceil(len(dataset) / cfg.train.batch_size)
    metrics = {"source": _validate(loaded, val_pairs, device, "source")}
    checkpoint.identity = {"source_run": str(loaded.run_dir.resolve()), "target_gmacs": float(target_gmacs),
                           "steps": int(steps), "arch_lr": float(arch_lr), "lambda": lam, "lr": float(cfg.train.lr)}
    result = search(loaded.model, loader_fn, target_gmacs, steps, arch_lr=arch_lr, lam=lam,
                    lr=cfg.train.lr, device=device, log=args.log, checkpoint=checkpoint)
    arch = rebuild(loaded.model.image_encoder)
    pruned = gmacs(encoder_block_flops(loaded.model.image_encoder, size)["total"])
    metrics["pruned"] = _validate(loaded, val_pairs, device, "pruned")
    record = {"source_run": str(loaded.run_dir.resolve()), "dense_gmacs": result.dense_gmacs,
              "target_gmacs": target_gmacs, "pruned_gmacs": pruned, "reached": result.reached,
              "search_gmacs": result.search_gmacs, "lambda": result.lam, "search_steps": steps, "arch_lr": arch_lr}
    metric_name = make_task(cfg).selection_metric(cfg.train.metric)
    return arch, record, {"history": result.history, "metric": metric_name, "metrics": metrics}


def prune_run(args: PruneArgs) -> PruneReport:
    """Prune ``args.run_dir`` to ``args.target_gmacs`` per image and write the pruned run (module doc;
    the options: :class:`PruneArgs`)."""
    device = args.device if isinstance(args.device, torch.device) else pick_device(args.device)
    _check_options(args)
    if args.resume and args.out_dir is not None and (Path(args.out_dir) / PRUNED_FILE).is_file():
        _check_resumable(Path(args.out_dir))
        return _resume(Path(args.out_dir), device, args.show_progress, args.overrides)
    steps, epochs = args.search_steps, args.search_epochs
    if (steps is None) == (epochs is None):
        raise PruneError(f"prune: give one of search steps ({steps}) or search epochs ({epochs}), >= 1")
    if args.run_dir is None or args.target_gmacs is None:
        raise PruneError(f"prune: needs the source run and a positive target GMACs (got {args.run_dir}, "
                         f"{args.target_gmacs})")
    run_dir = Path(args.run_dir)
    out = _out_path(run_dir, args.out_dir)
    if args.resume:
        _check_resumable(out)
    loaded = load_run(run_dir, device)
    if loaded.cfg.model.family != "sam":
        raise PruneError(f"{run_dir}: samft prune is for SAM 1 runs; this run is model.family="
                         f"{loaded.cfg.model.family} (SPViT's block choices are written for the ViT encoder)")
    if loaded.cfg.model.pruned:
        raise PruneError(f"{run_dir}: is already a pruned run (model.pruned); prune its source run instead")
    if make_task(loaded.cfg).kind != "binary":  # the search's loss is written for one mask token
        raise PruneError(f"{run_dir}: pruning supports binary-mask runs for now (this run is multi-class)")
    _check_target(loaded, args.target_gmacs)
    cfg = pruned_config(loaded.cfg, out, args.finetune_epochs, device, args.overrides)  # bad overrides fail early
    _claim_out(out, args.overwrite, args.resume)
    checkpoint = SearchCheckpoint(out / SEARCH_STATE_FILE, args.search_save_every, atomic_torch_save)
    _note_search_start(checkpoint.path, args.resume)
    arch, record, report = _search_phase(loaded, args, device, checkpoint)
    record["finetune_epochs"] = args.finetune_epochs
    sha = _write(out, loaded, cfg, arch, record, report)
    checkpoint.path.unlink(missing_ok=True)
    if args.finetune_epochs:
        _finetune(cfg, out, resume=False, show_progress=args.show_progress)
    else:
        save_adapter(loaded.model, out / ADAPTER_FILE, adapter_expectations(cfg, sha, loaded.model))
    return _finish(out, arch, record, report, device)


def _check_target(loaded: LoadedRun, target: float) -> None:
    """A target the search cannot reach (below the floor) or need not (not below the dense encoder) is refused
    in one line, before anything is written."""
    size = loaded.model.img_size
    check_reachable(loaded.model.image_encoder, size, target)
    dense = gmacs(encoder_block_flops(loaded.model.image_encoder, size)["total"])
    if target >= dense:
        raise PruneError(f"prune --target-gmacs {target:.4g}: not below this run's dense encoder ({dense:.4g} GMACs): "
                         "nothing to prune; nothing was written")


def _note_search_start(state: Path, resume: bool) -> None:
    """A fresh search drops an earlier one's state; a resumed one says where it continues from."""
    if not resume:
        state.unlink(missing_ok=True)
    elif state.is_file():
        warnings.warn(f"prune --resume: continuing the search saved in {state}", stacklevel=3)
    else:
        warnings.warn(f"prune --resume: {state.parent} holds no saved search state: searching from the start",
                      stacklevel=3)


def _finetune(cfg: Config, out: Path, resume: bool, show_progress: bool) -> None:
    """The normal training loop on the pruned run's config (its base: the pruned model)."""
    from samft.engine.train.loop import train

    try:
        train(cfg, resume=resume, show_progress=show_progress)
    except Exception:
        if not (out / CONFIG_FILE).is_file():  # a failed start removed config + marker: keep the run resumable
            RunDir(out).init(dump_yaml(cfg))
        raise


def _resume(out: Path, device: torch.device, show_progress: bool, overrides: Optional[list[str]]) -> PruneReport:
    """Continue the fine-tuning of a pruned run (``overrides`` as ``samft train --resume`` takes them)."""
    cfg = RunDir(out).read_config(overrides)
    cfg.output.dir = str(out)
    try:
        record = prune_files.read_architecture(out / ARCH_FILE)
        report = prune_files.read_report(out / REPORT_FILE)
    except SamftError as e:
        raise PruneError(f"{out}: not a pruned run to resume ({e})") from None
    arch = record.pop("architecture")
    if record.get("finetune_epochs"):
        _finetune(cfg, out, resume=True, show_progress=show_progress)
    else:
        warnings.warn(f"prune --resume: {out} was pruned without fine-tuning: nothing to continue (fine-tune it "
                      f"with: samft train --resume {out} train.epochs=N)", stacklevel=3)
    return _finish(out, arch, record, report, device)


def _finish(out: Path, arch: dict, record: dict, report: dict, device: torch.device) -> PruneReport:
    """Load the finished run as every command does, validate the fine-tuned model, write prune.json."""
    loaded = load_run(out, device)
    if record.get("finetune_epochs"):
        report["metrics"]["finetuned"] = _validate(loaded, train_val_pairs(loaded.cfg.data)[1], device, "finetuned")
    prune_files.write(out / REPORT_FILE, {**record, **report})
    return PruneReport(out, arch, record["dense_gmacs"], record["target_gmacs"], record["pruned_gmacs"],
                       record["reached"], report["metrics"], loaded.model, record.get("search_gmacs"))


def _write(out: Path, loaded: LoadedRun, cfg: Config, arch: dict, record: dict, report: dict) -> str:
    """The pruned run's files before fine-tuning; returns the pruned file's identity (``pruned:<sha256>``)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = {"format": PRUNED_FORMAT, "architecture": json.dumps(arch), "peft_method": cfg.peft.method,
            "sam_type": cfg.model.type, "adapter_meta": json.dumps(loaded.meta)}
    data = st_save(state, metadata=meta)
    RunDir(out).init(dump_yaml(cfg))  # the marker (samft's folder) and config.yaml; stale run files go
    atomic_write_bytes(out / PRUNED_FILE, data)
    prune_files.write(out / ARCH_FILE, {**record, "architecture": arch})
    prune_files.write(out / REPORT_FILE, {**record, **report})
    return "pruned:" + hashlib.sha256(data).hexdigest()


def read_architecture(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The architecture description of a pruned run, or None for a dense run."""
    path = Path(run_dir) / ARCH_FILE
    if not path.is_file():
        return None
    try:
        return prune_files.read_architecture(path)["architecture"]
    except SamftError as e:
        raise PruneError(f"{path}: not a samft architecture file ({str(e).split(': ', 1)[-1]})") from None


def load_pruned_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A pruned run's model exactly as it left the search (before fine-tuning): the base model of its
    config rebuilt to the architecture with ``pruned.safetensors`` loaded. ``load_run`` gives the run's
    trained model (its best adapter on that base), as every command uses it."""
    run_dir = Path(run_dir)
    if read_architecture(run_dir) is None:
        raise PruneError(f"{run_dir}: not a pruned run ({ARCH_FILE} not found)")
    cfg = RunDir(run_dir).read_config()
    locate_pruned(run_dir, cfg)
    built = build_model(cfg)
    _, _, meta, _ = read_pruned(cfg.model.pruned, tensors=False)
    return LoadedRun(run_dir, cfg, built.model.to(torch.device(device)).eval(), meta)
