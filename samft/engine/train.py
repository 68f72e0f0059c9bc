"""The training loop.

AdamW on the trainable tensors (PEFT layers + mask decoder), linear warm-up then linear decay, gradient
accumulation and clipping, autocast (bf16 on CUDA by default; fp16 with a GradScaler), validation every
``val_every`` epochs at the original resolution, the best and the last adapter kept.

Loss = task loss + ``loss.balance_weight`` x the Conv-LoRA balance loss (0 for other methods); the task
loss is the structure loss for binary masks and MaskFormer's matched set loss (class CE + mask BCE + mask
Dice, Hungarian matching) for multi-class masks (``data.classes``).

Nothing is lost on an interruption: ``state.safetensors`` (trainable tensors, optimizer, scheduler, step, RNG)
is written atomically at each epoch end and every ``train.save_every`` steps, and on Ctrl-C / SIGTERM
the state of the last completed step is saved before exiting. ``--resume`` continues from it with the
same data order, augmentation and noise as an uninterrupted run: the data order comes from
(seed, epoch), each sample's augmentation from (seed, epoch, index), and the RNG states are restored.
"""

from __future__ import annotations

import contextlib
import csv
import math
import signal
import time
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from samft import __version__, peft
from samft.config import Config, config_hash, dump_yaml
from samft.data.check import check_data, require_clean
from samft.data.classes import ClassSpec
from samft.data.datasets import TrainDataset, collate
from samft.data.layouts import train_val_pairs
from samft.data.transforms import valid_mask
from samft.engine import distributed as D
from samft.engine.checkpoint import (atomic_write_text, load_resume_state, load_trainable, read_adapter, rng_state,
                                     save_adapter, save_resume_state, set_rng_state, trainable_state)
from samft.engine.evaluate import evaluate_pairs
from samft.engine.progress import console, progress
from samft.engine.runs import (ADAPTER_FILE, CONFIG_FILE, LAST_ADAPTER_FILE, METRICS_FILE, PLOT_FILE, STATE_FILE,
                               adapter_expectations)
from samft.engine.runtime import autocast, check_compile, compile_blocks, pick_device, resolve_precision
from samft.errors import CheckpointError, SamftError
from samft.losses import SetLossWeights, set_loss, structure_loss
from samft.metrics import higher_is_better, selection_metric, task_metric_names
from samft.model import build_model, count_params
from samft.model.semantic import SemanticSAM, upsample_logits


class TrainingInterrupted(SamftError):
    """Ctrl-C or SIGTERM: the state of the last completed step was saved."""


class TrainingDiverged(SamftError):
    """The loss became NaN or infinite."""


STEP_COLUMNS = ["kind", "epoch", "step", "lr", "loss", "task_loss", "aux_loss", "grad_norm", "images_per_s", "seconds"]


class MetricsLog:
    """``metrics.csv``: one row per logged step and one per epoch, appended as training goes."""

    def __init__(self, path: Path, keep_until_step: Optional[int], enabled: bool, multiclass: bool = False) -> None:
        self.path, self.enabled = path, enabled
        self.columns = STEP_COLUMNS + [f"val_{name}" for name in task_metric_names(multiclass)]
        if not enabled:
            return
        rows: list[dict] = []
        if keep_until_step is not None and path.is_file():
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        if int(row["step"]) <= keep_until_step:
                            rows.append(row)
                    except (KeyError, TypeError, ValueError):
                        continue  # a row cut short by a kill
        lines = [",".join(self.columns)] + [",".join(str(r.get(c) or "") for c in self.columns) for r in rows]
        atomic_write_text(path, "\n".join(lines) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        cells = []
        for c in self.columns:
            v = row.get(c, "")
            cells.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        with open(self.path, "a") as f:
            f.write(",".join(cells) + "\n")


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run_dir: Path, metric: str) -> None:
    """``curves.png``: training loss per step and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / METRICS_FILE)
    steps = [r for r in rows if r["kind"] == "step" and r["loss"]]
    epochs = [r for r in rows if r["kind"] == "epoch" and r.get(f"val_{metric}")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps], label="loss")
    axes[0].plot([int(r["step"]) for r in steps], [float(r["task_loss"]) for r in steps], label="task loss", alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss")
    if steps:
        axes[0].legend()
    names = ["mIoU", "mAcc", "pixel_acc"] if metric in ("mIoU", "mAcc", "pixel_acc") else [
        "dice@0.5", "meanDice", "Sm", "wFm", "meanEm", "MAE"]  # BER (percent) only when it is the metric
    shown = dict.fromkeys(names + [metric])
    for name in shown:
        values = [(int(r["epoch"]), float(r[f"val_{name}"])) for r in epochs if r.get(f"val_{name}")]
        if values:
            axes[1].plot(*zip(*values), marker="o", label=name, linewidth=2.5 if name == metric else 1)
    axes[1].set_xlabel("epoch")
    axes[1].set_title(f"validation (best by {metric})")
    if axes[1].lines:  # nothing to label before the first validation (train.val_every > 1)
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = run_dir / f".{PLOT_FILE}.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(run_dir / PLOT_FILE)


class SkipSampler(Sampler):
    """Yield ``sampler``'s indices after skipping the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then linear decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return max(min_ratio, 1.0 - frac * (1.0 - min_ratio))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices and convolution kernels decay, biases/norms/embeddings-of-one-row do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based)
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done
    best_value: Optional[float] = None
    best_epoch: int = -1
    epoch_loss_sum: float = 0.0  # running sum/count of this epoch's step losses (survives a resume)
    epoch_loss_count: int = 0
    rng: dict = field(default_factory=dict)  # RNG state right after the last completed step


def _better(value: float, best: Optional[float], metric: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if higher_is_better(metric) else value < best


class RunLock:
    """An exclusive lock on a run directory, so two trainings never write into the same run."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path, self.enabled, self.handle = run_dir / ".lock", enabled, None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise SamftError(f"{self.path.parent}: another samft process is training into this run directory") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()


def prepare_run_dir(cfg: Config, resume: bool, info: D.DistInfo) -> Path:
    run_dir = Path(cfg.output.dir or "runs/run")
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise SamftError(f"{run_dir}: nothing to resume ({STATE_FILE} not found)")
        if info.is_main:
            for stale in run_dir.glob(".*.tmp"):  # a write cut short by a kill: never renamed, never used
                stale.unlink(missing_ok=True)
        return run_dir
    occupied = any((run_dir / f).exists() for f in (STATE_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE))
    if occupied and not cfg.output.overwrite:
        raise SamftError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, choose another "
                         f"output.dir, or set output.overwrite=true to replace it")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for f in (STATE_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE, METRICS_FILE, PLOT_FILE, "eval.json"):
            (run_dir / f).unlink(missing_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(cfg))
    D.barrier(info)
    return run_dir


class _StopSignal:
    """Turn SIGTERM into KeyboardInterrupt so both end the same, saved way."""

    def __enter__(self) -> "_StopSignal":
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _handler(signum, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def train(cfg: Config, resume: bool = False, show_progress: bool = True) -> Path:
    """Train ``cfg`` into ``cfg.output.dir`` (or continue the run there when ``resume``); returns the run dir."""
    info = D.setup(cfg.train.device)
    ok = False
    try:
        with _StopSignal(), RunLock(Path(cfg.output.dir or "runs/run"), info.is_main):
            run_dir = _train(cfg, resume, show_progress, info)
        ok = True
        return run_dir
    finally:
        D.cleanup(graceful=ok)


def _train(cfg: Config, resume: bool, show_progress: bool, info: D.DistInfo) -> Path:
    tc = cfg.train
    main = info.is_main
    device = D.device_for(info, pick_device(tc.device))
    precision = resolve_precision(tc.precision, device)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    torch.manual_seed(tc.seed)

    if not resume:  # relative paths are stored absolute so the run can be evaluated from anywhere
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
        if cfg.model.checkpoint:
            cfg.model.checkpoint = str(Path(cfg.model.checkpoint).expanduser().resolve())
    if cfg.data.check != "off":  # before anything is written: a bad dataset must not cost a run directory
        report = check_data(cfg, show_progress=show_progress) if main else None
        if D.broadcast_flag(bool(report and report.problems), info, device):
            if main:
                require_clean(report)
            raise SamftError("the data check on rank 0 found problems")
        if main:
            for warning in report.warnings:
                warnings.warn(warning, stacklevel=2)
    run_dir = prepare_run_dir(cfg, resume, info)
    train_pairs, val_pairs = train_val_pairs(cfg.data)

    if tc.compile:
        check_compile(device)
    built = build_model(cfg)
    model: SemanticSAM = built.model.to(device)
    model.grad_checkpointing = tc.grad_checkpointing
    if tc.compile:
        compile_blocks(model.image_encoder.blocks)
    spec = peft.get(cfg.peft.method)
    params = count_params(model)
    meta_base = {**adapter_expectations(cfg, built.base_sha256), "img_size": str(model.img_size),
                 "config_hash": config_hash(cfg), "config_yaml": dump_yaml(cfg)}

    classes = ClassSpec.of(cfg.data)
    metric = selection_metric(tc.metric, classes is not None)
    dataset = TrainDataset(train_pairs, model.img_size, tc.hflip, tc.seed, classes)
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=tc.seed)
    micro_per_epoch = math.ceil(len(sampler) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.accum_steps)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, total_steps, tc.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    state = TrainState()
    if resume:
        saved = load_resume_state(run_dir / STATE_FILE)
        load_trainable(model, saved["trainable"], str(run_dir / STATE_FILE))
        try:  # a state edited by hand or from another run: one line, not a traceback
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            state = TrainState(**saved["progress"])
            set_rng_state(state.rng)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{run_dir / STATE_FILE}: does not fit this run ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        best_path = run_dir / ADAPTER_FILE
        if best_path.is_file():  # the best adapter may be newer than the state (killed in between)
            best_meta = read_adapter(best_path)[1]
            if "best_value" in best_meta and _better(float(best_meta["best_value"]), state.best_value, metric):
                state.best_value, state.best_epoch = float(best_meta["best_value"]), int(best_meta["epoch"])
        if main:
            console.print(f"resuming {run_dir} at step {state.step}/{total_steps} (epoch {state.epoch + 1})")
    log = MetricsLog(run_dir / METRICS_FILE, state.step if resume else None, main, classes is not None)

    ddp_model: torch.nn.Module = model
    if info.enabled:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            find_unused_parameters=spec.unused_params)

    if main:
        speed = [f"{cfg.model.attention} attention"] + (["checkpointing"] if tc.grad_checkpointing else []) + (
            ["compiled"] if tc.compile else [])
        procs = f" x {info.world_size} processes" if info.enabled else ""
        console.print(f"[bold]samft {__version__}[/] {cfg.model.type} + {cfg.peft.method}: "
                      f"{params['trainable_params']:,} trainable of {params['total_params']:,} parameters | "
                      f"{len(train_pairs)} train / {len(val_pairs)} val images | {device}{procs} {precision}, "
                      f"{', '.join(speed)} | {total_steps} steps -> {run_dir}")

    def save_state(snapshot_rng: dict) -> None:
        if not main:
            return
        save_adapter(model, run_dir / LAST_ADAPTER_FILE, {**meta_base, "step": str(state.step),
                                                         "epoch": str(state.epoch)})
        save_resume_state(run_dir / STATE_FILE, {
            "samft_version": __version__,
            "trainable": {k: v.cpu().clone() for k, v in trainable_state(model).items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "progress": {**state.__dict__, "rng": snapshot_rng},
        })

    def validate(epoch_no: int) -> dict[str, float]:
        # validation must not move the RNG streams, or a resumed run would differ from an uninterrupted one
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = evaluate_pairs(model, D.shard(val_pairs, info), cfg, device, precision, f"val {epoch_no}",
                                     show_progress and main)
        return D.merge_across(metrics, info).compute()

    last_rng = state.rng or rng_state()
    window: list[float] = []
    t_log, images_since = time.perf_counter(), 0
    try:
        while state.step < total_steps and state.epoch < tc.epochs:
            dataset.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            skip = state.micro_in_epoch * tc.batch_size
            loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=SkipSampler(sampler, skip),
                                num_workers=cfg.data.num_workers, collate_fn=collate, drop_last=False,
                                pin_memory=device.type == "cuda", generator=torch.Generator())
            ddp_model.train()
            remaining = micro_per_epoch - state.micro_in_epoch
            steps_left_epoch = min(math.ceil(remaining / tc.accum_steps), total_steps - state.step)
            with progress(f"epoch {state.epoch + 1}/{tc.epochs}", steps_left_epoch, show_progress and main) as advance:
                micro_iter = iter(loader)
                while state.step < total_steps:
                    chunk = list(islice(micro_iter, tc.accum_steps))
                    if not chunk:
                        break
                    stats = _optimizer_step(ddp_model, model, chunk, cfg, device, precision, optimizer, scaler,
                                            state, info)
                    scheduler.step()
                    state.step += 1
                    state.micro_in_epoch += len(chunk)
                    last_rng = rng_state()
                    window.append(stats["loss"])
                    state.epoch_loss_sum += stats["loss"]
                    state.epoch_loss_count += 1
                    images_since += stats["images"]
                    advance(1, f"loss {stats['loss']:.4f}")
                    if state.step % tc.log_every == 0 or state.step == total_steps:
                        now = time.perf_counter()
                        log.write({"kind": "step", "epoch": state.epoch + 1, "step": state.step,
                                   "lr": scheduler.get_last_lr()[0], **stats,
                                   "loss": sum(window) / len(window),
                                   "images_per_s": images_since * info.world_size / max(now - t_log, 1e-9),
                                   "seconds": now - t_log})
                        window, t_log, images_since = [], now, 0
                    if tc.save_every and state.step % tc.save_every == 0:
                        save_state(last_rng)
            epoch_done = state.micro_in_epoch >= micro_per_epoch
            finished = state.step >= total_steps or (epoch_done and state.epoch + 1 >= tc.epochs)
            if epoch_done or finished:
                epoch_no = state.epoch + 1
                row: dict[str, Any] = {"kind": "epoch", "epoch": epoch_no, "step": state.step,
                                       "loss": state.epoch_loss_sum / max(1, state.epoch_loss_count)}
                if finished or epoch_no % tc.val_every == 0:
                    results = validate(epoch_no)
                    row.update({f"val_{k}": v for k, v in results.items()})
                    value = results[metric]
                    if _better(value, state.best_value, metric):
                        state.best_value, state.best_epoch = value, row["epoch"]
                        if main:
                            save_adapter(model, run_dir / ADAPTER_FILE, {
                                **meta_base, "step": str(state.step), "epoch": str(row["epoch"]),
                                "metric": metric, "best_value": repr(value)})
                    if main:
                        shown = " ".join(f"{k}={v:.4f}" for k, v in results.items())
                        console.print(f"epoch {row['epoch']}: loss {row['loss']:.4f} | val {shown} | best {metric} "
                                      f"{state.best_value:.4f} (epoch {state.best_epoch})")
                if epoch_done:
                    state.epoch += 1
                    state.micro_in_epoch = 0
                    state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
                log.write(row)
                save_state(last_rng)
                if main:
                    plot_curves(run_dir, metric)
    except KeyboardInterrupt:
        save_state(last_rng)
        raise TrainingInterrupted(f"interrupted at step {state.step}; the run is saved, continue it with: "
                                  f"samft train --resume {run_dir}") from None
    if info.enabled:  # DDP keeps the processes in step; check it (cheap: once per run)
        digest = D.check_in_sync(trainable_state(model), info)
        if main:
            console.print(f"all {info.world_size} processes hold identical trainable weights (sha256 {digest})")
    D.barrier(info)
    if main and not (run_dir / ADAPTER_FILE).exists():
        warnings.warn("no validation result was finite; adapter.safetensors holds the last weights", stacklevel=2)
        save_adapter(model, run_dir / ADAPTER_FILE, {**meta_base, "step": str(state.step), "epoch": str(state.epoch)})
    return run_dir


def _optimizer_step(ddp_model: torch.nn.Module, model: SemanticSAM, chunk: list[dict], cfg: Config,
                    device: torch.device, precision: str, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, state: TrainState, info: D.DistInfo) -> dict[str, float]:
    """Forward/backward over the micro-batches of one optimizer step, then clip and step."""
    tc = cfg.train
    size = model.img_size
    totals = {"loss": 0.0, "task_loss": 0.0, "aux_loss": 0.0}
    images = 0
    classes = ClassSpec.of(cfg.data)
    weights = SetLossWeights(cfg.loss.class_weight, cfg.loss.mask_bce_weight, cfg.loss.mask_dice_weight,
                             cfg.loss.no_object_weight)
    balance = cfg.loss.balance_weight if cfg.loss.balance_weight is not None else (2.0 if classes else 1.0)
    for i, batch in enumerate(chunk):
        x = batch["image"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        valid = valid_mask(batch["valid_hw"].to(device), size) if cfg.loss.ignore_padding else None
        sync = i == len(chunk) - 1 or not isinstance(ddp_model, DistributedDataParallel)
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            with autocast(device, precision):
                out = ddp_model(x)
            logits = upsample_logits(out.masks, (size, size))
            if classes is None:
                task = structure_loss(logits, mask.float().unsqueeze(1), valid, cfg.loss.bce, cfg.loss.iou)
            else:
                keep = valid[:, 0].bool() if valid is not None else torch.ones_like(mask, dtype=torch.bool)
                task = set_loss(out.class_logits, logits, mask.long(), keep, classes.ignore_index, weights)["loss"]
            loss = task + balance * out.aux_loss
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at step {state.step + 1} (epoch {state.epoch + 1}); training stopped. "
                    f"The last good checkpoint is kept in {cfg.output.dir} (resume with --resume after lowering "
                    f"train.lr or checking the data)")
            scaler.scale(loss / len(chunk)).backward()
        totals["loss"] += value / len(chunk)
        totals["task_loss"] += float(task.detach()) / len(chunk)
        totals["aux_loss"] += float(out.aux_loss.detach()) / len(chunk)
        images += x.shape[0]
    scaler.unscale_(optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if tc.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in trainable if p.grad is not None])))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": grad_norm, "images": images}
