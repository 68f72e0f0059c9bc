"""The training loop.

AdamW on the trainable tensors (PEFT layers + mask decoder), linear warm-up then linear decay, gradient
accumulation and clipping, autocast (bf16 on CUDA by default; fp16 with a GradScaler), validation every
``val_every`` epochs at the original resolution, the best and the last adapter kept; with ``train.patience``
the run stops early once the selection metric has not improved for that many validations (the count is in
the resumable state).

Loss = the task's loss (structure loss for binary masks; MaskFormer's matched set loss for multi-class)
+ every named value of every loss term (:class:`samft.tasks.terms.LossTerm`) x its weight: the model's
auxiliary losses (Conv-LoRA's ``balance``, x ``loss.aux.<name>``), SLIP's terms, any term given. Each value
has its own ``aux_<name>`` column in ``metrics.csv``. The loop draws a micro-batch of every data stream
(the labelled one first; SLIP's unlabelled one) and resumes each exactly.

Nothing is lost on an interruption: the resumable state (``state.safetensors``: tensors and JSON, never a
pickle) is written atomically at each epoch end and
every ``train.save_every`` steps, and on Ctrl-C / SIGTERM the state of the last completed step is saved
before exiting. ``--resume`` continues from it with the same data order, augmentation and noise as an
uninterrupted run: the data order comes from (seed, epoch), each sample's augmentation from (seed, epoch,
index), and the RNG states are restored.

The parts: :func:`samft.engine.train.setup.prepare_run` and :func:`samft.engine.train.setup.build_training` set up,
:class:`~samft.engine.train.checkpointer.Checkpointer` saves and restores, :func:`train_step` is one optimizer
step, :class:`Fit` is the loop.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from samft.config import Config, config_hash, dump_yaml
from samft.data.datasets import TrainDataset, collate
from samft.data.transforms import valid_mask
from samft.data.workers import cap_workers, surfaced
from samft.engine import distributed as D
from samft.engine.artifacts import split_file
from samft.engine.artifacts.adapter import adapter_expectations, trainable_state
from samft.engine.artifacts.state import rng_state
from samft.engine.train.checkpointer import Checkpointer, TrainState, improved, resumed_text_embeddings
from samft.engine.train.loggers import Trackers, open_trackers, require
from samft.engine.infer.evaluate import evaluate_pairs
from samft.engine.artifacts.metrics_csv import MetricsLog, metrics_columns, plot_curves, read_metrics  # noqa: F401
from samft.engine.artifacts.rundir import (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, PLOT_FILE, SPLIT_FILE, RunDir,
                                           resume_changes)
from samft.engine.runtime import autocast, memory_advice
from samft.engine.train.schedule import lr_factor  # noqa: F401  (re-exported)
from samft.engine.train.slip import config_streams
from samft.engine.train.setup import (RunContext, Schedule, TrainingParts, build_training, describe_start,
                                make_optimizer, prepare_run)  # noqa: F401  (re-exported)
from samft.engine.train.streams import StreamCursor, epoch_loader
from samft.errors import SamftError
from samft.model.semantic import upsample_logits
from samft.progress import console, progress
from samft.slip.text import clamp_logit_scales
from samft.tasks.metrics import for_every_image
from samft.tasks.task import make_task
from samft.tasks.terms import LABELLED, DataStream, LossTerm


class TrainingInterrupted(SamftError):
    """Ctrl-C or SIGTERM: the state of the last completed step was saved."""


class TrainingDiverged(SamftError):
    """The loss became NaN or infinite."""


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


def train(cfg: Config, resume: bool = False, show_progress: bool = True, streams: Optional[list[DataStream]] = None,
          terms: Optional[list[LossTerm]] = None) -> Path:
    """Train ``cfg`` into ``cfg.output.dir`` (or continue the run there when ``resume``); returns the run dir.

    ``streams``: further data streams (:class:`~samft.tasks.terms.DataStream`) and ``terms``: further loss
    terms (:class:`~samft.tasks.terms.LossTerm`, each reading the labelled stream or one of ``streams``),
    besides those the config asks for (SLIP's: :mod:`samft.slip.terms`).
    """
    with D.distributed(cfg.train.device) as info, _StopSignal(), \
            RunDir(cfg.output.dir or "runs/run").lock(info.is_main), memory_advice(*_train_memory(cfg)):
        return _train(cfg, resume, show_progress, info, list(streams or []), list(terms or []))


def _train_memory(cfg: Config) -> tuple[str, str]:
    """What a training that ran out of memory held, and what to set (:func:`memory_advice`)."""
    tc = cfg.train
    what = f"a batch of {tc.batch_size or 'train.batch_size'} image(s) at model.img_size={cfg.model.img_size}"
    advice = ["a lower train.batch_size (train.accum_steps keeps the effective batch)", "a lower model.img_size"]
    if not tc.grad_checkpointing:
        advice.append("train.grad_checkpointing=true (much less memory, about 1/3 more time)")
    return what, f"set {', '.join(advice[:-1])} or {advice[-1]}"


def _claim(run: RunDir, cfg: Config, resume: bool, main: bool) -> tuple[bool, bool]:
    """(resume, whether the folder existed): a run killed before its first save (at most ``adapter_last``, which
    is written before the state) starts again in place; a run with a best adapter but no resumable state is
    refused (starting it again would delete them) unless ``output.overwrite``; a fresh start claims the folder
    (:meth:`RunDir.claim`). samft's own temporary files of a kill are cleaned only once the folder is claimed."""
    if resume and not run.state_path.is_file():
        if (run.path / ADAPTER_FILE).is_file() and not cfg.output.overwrite:  # the best: written after a state
            raise SamftError(f"{run.path}: has trained weights but no {run.state_path.name}, so --resume cannot "
                             f"continue it; start a new run from its config (samft train --config "
                             f"{run.config_path} output.dir=NEW_DIR), or add output.overwrite=true to train this "
                             f"one again from step 0, deleting its adapters, metrics and eval.json")
        resume = False  # nothing was saved yet (killed before the first save): start again in place
        cfg.output.overwrite = True
        if main:
            console.print(f"note: {run.path} has no saved state yet; starting it again from step 0")
    existed = run.claim(cfg.output.overwrite) if not resume else True
    if main:
        run.clean_stale_tmp()
    return resume, existed


def _train(cfg: Config, resume: bool, show_progress: bool, info: D.DistInfo, streams: list[DataStream],
           terms: list[LossTerm]) -> Path:
    run = RunDir(cfg.output.dir or "runs/run")
    resume, existed = _claim(run, cfg, resume, info.is_main)
    changes = resume_changes(run.read_config(), cfg) if resume else {}
    ctx = prepare_run(cfg, resume, info, show_progress)
    fit = Fit(ctx, streams + config_streams(ctx), terms)
    if resume:
        fit.restore()  # every check of the saved state first: a refused resume changes nothing
    if not resume and ctx.main:
        run.init(dump_yaml(cfg))
        fit.write_split()
    if changes and ctx.main:
        run.record_resume(changes, "resume", dump_yaml(cfg))
        console.print("resuming with " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    D.barrier(info)
    try:
        fit.run()
    except Exception as e:
        if not resume and ctx.main:
            run.remove_failed_start(existed)
        if isinstance(e, TrainingDiverged):
            raise _diverged(e, run, cfg) from None
        raise
    return run.path


def _diverged(e: TrainingDiverged, run: RunDir, cfg: Config) -> TrainingDiverged:
    """The divergence in one line, with advice that works: whether a saved state exists, and a new run with a
    lower ``train.lr`` (computed from this one's) or gradient clipping, since ``--resume`` keeps both."""
    tc = cfg.train
    if run.state_path.is_file():
        saved = (f"the state saved before it is kept in {run.state_path} (--resume would continue with the same "
                 f"train.lr and train.grad_clip, which it cannot change)")
    else:
        saved = "nothing was saved (no resumable state)"
    config = f"--config {run.config_path} output.dir=NEW_DIR" if run.config_path.is_file() else "--config YOUR_CONFIG"
    fixes = [f"train.lr={tc.lr / 3:.3g} (a third of {tc.lr:g})"] if tc.lr > 0 else []
    fixes.append("train.grad_clip=1.0 (clipping is off)" if tc.grad_clip <= 0 else
                 f"train.grad_clip={tc.grad_clip / 2:.3g} (half of {tc.grad_clip:g})")
    return TrainingDiverged(f"{e}; {saved}. Start a new run with samft train {config} and {' or '.join(fixes)}, "
                            f"and check the data")


SMALL_VAL = 5  # fewer validation images than this make the best epoch and the curves noise


def _batch_size(batch: Any) -> int:
    return int(batch["image"].shape[0]) if isinstance(batch, dict) and "image" in batch else 1


def _loss_terms(parts: TrainingParts, batches: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The task loss of the labelled batch and every named value of every loss term (the model's auxiliary
    losses, SLIP's, given terms). One call of ``parts.module`` (the TrainingModule, DDP-wrapped under torchrun)
    computes the labelled forward and every term; the task loss is computed from its output."""
    batch = batches[LABELLED]
    size = parts.model.img_size
    x = batch["image"].to(parts.device, non_blocking=True)
    target = batch["mask"].to(parts.device, non_blocking=True)
    valid = valid_mask(batch["valid_hw"].to(parts.device), size) if parts.cfg.loss.ignore_padding else None
    with autocast(parts.device, parts.precision):
        out, values = parts.module(x, batches)
    logits = upsample_logits(out.masks, (size, size))
    task = parts.task.loss(logits, out.class_logits, target, valid)
    return task, values


def train_step(parts: TrainingParts, micro_batches: list[dict[str, Any]], step: int = 0, epoch: int = 0
               ) -> dict[str, float]:
    """One optimizer step: forward/backward over the micro-batches (each a dict stream name -> batch,
    ``labelled`` first), then unscale, clip and step. Returns the step's mean loss, task loss, each
    ``aux_<name>`` term (unweighted), the gradient norm and the number of labelled images."""
    n = len(micro_batches)
    weights = parts.weights
    totals = {"loss": 0.0, "task_loss": 0.0, **{f"aux_{k}": 0.0 for k in weights}}
    images = 0
    for i, batches in enumerate(micro_batches):
        sync = i == n - 1 or not isinstance(parts.module, DistributedDataParallel)
        with contextlib.nullcontext() if sync else parts.module.no_sync():
            task, terms = _loss_terms(parts, batches)
            loss = task
            for name, value in terms.items():
                loss = loss + weights.get(name, 1.0) * value
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss became {value} at step {step + 1} (epoch {epoch + 1}); training "
                                       f"stopped")  # the run's advice is added by train() (_diverged)
            parts.scaler.scale(loss / n).backward()
        totals["loss"] += value / n
        totals["task_loss"] += float(task.detach()) / n
        for name, term in terms.items():
            totals[f"aux_{name}"] = totals.get(f"aux_{name}", 0.0) + float(term.detach()) / n
        images += _batch_size(batches[LABELLED])
    return {**totals, "grad_norm": _optimizer_update(parts), "images": images}


def _optimizer_update(parts: TrainingParts) -> float:
    """Unscale, clip (``train.grad_clip``), step and zero the gradients; returns the gradient norm."""
    parts.scaler.unscale_(parts.optimizer)
    trainable = parts.trainable_parameters()  # the model's, then the extra streams' modules'
    if parts.cfg.train.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, parts.cfg.train.grad_clip))
    else:
        grads = [p.grad.detach().norm() for p in trainable if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    clamp_logit_scales(parts.module)  # the text heads' scales, as SLIP: the parameter itself, after the step
    return grad_norm


def _check_streams(streams: list[DataStream], terms: list[LossTerm]) -> list[DataStream]:
    """The streams, each named once (not ``labelled``), and every term's stream among them (else one line)."""
    names = [LABELLED]
    for stream in streams:
        if stream.name in names:
            raise SamftError(f"data stream {stream.name!r}: the name is taken (by the labelled stream or another "
                             f"stream)")
        names.append(stream.name)
    for term in terms:
        if term.stream not in names:
            raise SamftError(f"loss term {term.name!r} reads the data stream {term.stream!r}, which the training does "
                             f"not have (streams: {', '.join(names)})")
    return streams


class Fit:
    """The loop over epochs and steps of one training (see the module docstring)."""

    def __init__(self, ctx: RunContext, streams: list[DataStream], terms: list[LossTerm] = ()) -> None:
        cfg, info = ctx.cfg, ctx.info
        self.ctx, self.cfg, self.tc, self.info, self.main = ctx, cfg, cfg.train, info, ctx.main
        self.restored = False
        self.last_degenerate: Optional[str] = None
        if 0 < len(ctx.val_pairs) < SMALL_VAL and ctx.main:
            warnings.warn(f"the validation set has only {len(ctx.val_pairs)} image(s): the best epoch and the "
                          f"validation curves will be noise; hold out more (data.val_fraction) or give a val split",
                          stacklevel=3)
        self.run_dir = ctx.run_dir
        require(cfg.train.loggers)  # a tracker's package missing: one line before anything is written
        self.trackers = Trackers([])
        task = make_task(cfg)
        self.dataset = TrainDataset(ctx.train_pairs, cfg.model.img_size, cfg.train.hflip, cfg.train.seed,
                                    task.classes, resize=cfg.data.resize)
        self.sampler = DistributedSampler(self.dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=cfg.train.seed)
        self.schedule = Schedule.of(cfg, len(self.sampler))
        self.workers = cap_workers(cfg.data.num_workers, len(self.sampler), cfg.train.batch_size)  # once per run
        self.parts = build_training(cfg, ctx.device, ctx.precision, self.schedule.total_steps, info, list(terms),
                                    task, resumed_text_embeddings(self.run_dir, cfg) if ctx.resume else None)
        self.streams = _check_streams(streams, self.parts.terms)
        self.metric = self.parts.task.selection_metric(cfg.train.metric)
        meta = {**adapter_expectations(cfg, self.parts.base_sha256, self.parts.model),
                "img_size": str(self.parts.model.img_size), "config_hash": config_hash(cfg), "config_yaml": dump_yaml(cfg)}
        self.checkpointer = Checkpointer(self.run_dir, self.parts, meta, self.metric, self.main)
        self.state = TrainState()
        self.window: dict[str, list[float]] = {}
        self.t_log, self.images_since = time.perf_counter(), 0

    def write_split(self) -> None:
        """``split.json``: the image (and mask) files of each split this run uses."""
        split_file.write(self.run_dir / SPLIT_FILE, {"train": self.ctx.train_pairs, "val": self.ctx.val_pairs})

    def restore(self) -> None:
        """Load the resumable state (its checks raise before anything in the run is written)."""
        self.state = self.checkpointer.restore()
        self.restored = True
        if self.main:
            console.print(f"resuming {self.run_dir} at step {self.state.step}/{self.schedule.total_steps} "
                          f"(epoch {self.state.epoch + 1})")

    def run(self) -> None:
        ctx, parts = self.ctx, self.parts
        if ctx.resume and not self.restored:
            self.restore()
        columns = metrics_columns(parts.loss_names, parts.task.metric_names)
        self.log = MetricsLog(self.run_dir / METRICS_FILE, columns, self.main, self.state.log_rows,
                              self.state.step if ctx.resume and self.state.log_rows is None else None)
        self.cursors = [StreamCursor(s.name, s.dataset, s.batch_size, self.tc.seed, self.info,
                                     self.cfg.data.num_workers, s.collate, self._pin, self.state.streams.get(s.name),
                                     s.drop_last)
                        for s in self.streams]
        if self._left() and self._stopped_early():  # a resumed run that had stopped early: nothing to do
            self._say(f"{self.run_dir} {self._stopped_early()}; nothing to do (train.patience=0 or a higher patience "
                      f"trains on)")
            return
        if self.main:
            console.print(describe_start(ctx, parts, self.schedule))
            self.trackers = self._open_trackers()
            self.t_log = time.perf_counter()  # the first row's throughput leaves the trackers' start out
        self.last_rng = self.state.rng or rng_state()
        self.positions = {c.name: c.position() for c in self.cursors}
        self._epochs()
        if self._left():
            self._say(self._stopped_early())
        self._finish()
        if (self.run_dir / ADAPTER_FILE).is_file():
            self.trackers.best(self.run_dir / ADAPTER_FILE)
        self.trackers.close("FINISHED", [self.run_dir / n for n in (CONFIG_FILE, METRICS_FILE, PLOT_FILE)])

    def _epochs(self) -> None:
        """The epochs left; Ctrl-C / SIGTERM saves the last completed step. The trackers are closed on the way
        out (MLflow: KILLED or FAILED)."""
        try:
            while self._left() and not self._stopped_early():
                self._epoch()
        except KeyboardInterrupt:
            self._save()
            self.trackers.close("KILLED", [])
            raise TrainingInterrupted(f"interrupted at step {self.state.step}; the run is saved, continue it with: "
                                      f"samft train --resume {self.run_dir}") from None
        except BaseException:
            self.trackers.close("FAILED", [])
            raise

    def _open_trackers(self) -> Trackers:
        """The trackers of ``train.loggers`` besides metrics.csv (:mod:`samft.engine.train.loggers`), continued
        from the saved state's step on resume."""
        resume = self.ctx.resume
        kept = read_metrics(self.run_dir / METRICS_FILE) if resume else []
        return open_trackers(self.cfg, self.run_dir, self.state.step if resume else None, kept,
                             self._validation_images, self.metric)

    def _validation_images(self):
        from samft.engine.train.loggers.images import validation_images

        return validation_images(self.parts.model, self.ctx.val_pairs, self.cfg, self.parts.task, self.ctx.device,
                                 self.ctx.precision)

    def _say(self, line: str) -> None:
        if self.main:
            console.print(line, markup=False)

    def _left(self) -> bool:
        """Whether the run has steps and epochs left (however it stopped)."""
        return self.state.step < self.schedule.total_steps and self.state.epoch < self.tc.epochs

    def _stopped_early(self) -> Optional[str]:
        """The line saying that the run stopped early (``train.patience`` validations without improvement of
        the metric, counted in the resumable state), or None."""
        st, patience = self.state, self.tc.patience
        if not patience or st.since_best < patience:
            return None
        best = f"best {st.best_value:.4f} at epoch {st.best_epoch}" if st.best_value is not None else "no best yet"
        return (f"stopped early at epoch {st.epoch}: no improvement of {self.metric} for {st.since_best} "
                f"validation{'s' if st.since_best > 1 else ''} ({best})")

    @property
    def _pin(self) -> bool:
        return self.ctx.device.type == "cuda"

    def _save(self) -> None:
        self.checkpointer.save(self.state, self.last_rng, self.log.rows, self.positions)
        self.trackers.commit()  # the rows so far are in the saved state: final

    def _epoch(self) -> None:
        st, tc, sched = self.state, self.tc, self.schedule
        loader = epoch_loader(self.dataset, self.sampler, st.epoch, st.micro_in_epoch * tc.batch_size, tc.batch_size,
                              self.workers, collate, self._pin)
        self.parts.module.train()
        for modules in self.parts.extra_modules.values():
            modules.train()
        remaining = sched.micro_per_epoch - st.micro_in_epoch
        steps_left = min(math.ceil(remaining / tc.accum_steps), sched.total_steps - st.step)
        show = self.ctx.show_progress and self.main
        with progress(f"epoch {st.epoch + 1}/{tc.epochs}", steps_left, show) as advance:
            micro_iter = surfaced(loader)  # a bad file in a worker is its one line
            while st.step < sched.total_steps:
                chunk = [batch for _, batch in zip(range(tc.accum_steps), micro_iter)]
                if not chunk:
                    break
                micro = [{LABELLED: b, **{c.name: c.next() for c in self.cursors}} for b in chunk]
                stats = train_step(self.parts, micro, st.step, st.epoch)
                self.parts.scheduler.step()
                st.step += 1
                st.micro_in_epoch += len(chunk)
                self.last_rng = rng_state()  # the state of the last *completed* step, like the positions
                self.positions = {c.name: c.position() for c in self.cursors}
                st.epoch_loss_sum += stats["loss"]
                st.epoch_loss_count += 1
                advance(1, f"loss {stats['loss']:.4f}")
                self._after_step(stats)
        epoch_done = st.micro_in_epoch >= sched.micro_per_epoch
        finished = st.step >= sched.total_steps or (epoch_done and st.epoch + 1 >= tc.epochs)
        if epoch_done or finished:
            self._end_epoch(epoch_done, finished)

    def _after_step(self, stats: dict[str, float]) -> None:
        st, tc = self.state, self.tc
        for key, value in stats.items():
            if key == "loss" or key == "task_loss" or key.startswith("aux_"):
                self.window.setdefault(key, []).append(value)
        self.images_since += stats["images"]
        if st.step % tc.log_every == 0 or st.step == self.schedule.total_steps:
            now = time.perf_counter()
            means = {k: sum(v) / len(v) for k, v in self.window.items()}
            self._write_row({"kind": "step", "epoch": st.epoch + 1, "step": st.step,
                             "lr": self.parts.scheduler.get_last_lr()[0], **means, "grad_norm": stats["grad_norm"],
                             "images_per_s": self.images_since * self.info.world_size / max(now - self.t_log, 1e-9),
                             "seconds": now - self.t_log})
            self.window, self.t_log, self.images_since = {}, now, 0
        if tc.save_every and st.step % tc.save_every == 0:
            self._save()

    def _end_epoch(self, epoch_done: bool, finished: bool) -> None:
        st = self.state
        epoch_no = st.epoch + 1
        row: dict[str, Any] = {"kind": "epoch", "epoch": epoch_no, "step": st.step,
                               "loss": st.epoch_loss_sum / max(1, st.epoch_loss_count)}
        if finished or epoch_no % self.tc.val_every == 0:
            results = self._validate(epoch_no)
            row.update({f"val_{k}": v for k, v in results.items()})
            self._count_patience(results[self.metric])
            if self.checkpointer.offer_best(st, epoch_no, results[self.metric]) and self.main:
                self.trackers.best(self.run_dir / ADAPTER_FILE)
            if self.main:
                shown = " ".join(f"{k}={v:.4f}" for k, v in results.items())
                best = f"{st.best_value:.4f} (epoch {st.best_epoch})" if st.best_value is not None else "none yet"
                console.print(f"epoch {epoch_no}: loss {row['loss']:.4f} | val {shown} | best {self.metric} {best}")
        if epoch_done:
            st.epoch += 1
            st.micro_in_epoch = 0
            st.epoch_loss_sum, st.epoch_loss_count = 0.0, 0
        self._write_row(row)
        self._save()
        if self.main:
            plot_curves(self.run_dir, METRICS_FILE, PLOT_FILE, self.metric, self.parts.task.plot_metrics)

    def _write_row(self, row: dict[str, Any]) -> None:
        """A row of metrics.csv, and the same to the trackers (rank 0)."""
        self.log.write(row)
        self.trackers.row(row)

    def _count_patience(self, value: float) -> None:
        """Count the validations without strict improvement (``train.patience``), against the state's own
        reference: a validation replayed after a kill between the best adapter and the state counts as it did."""
        st = self.state
        if improved(value, st.stop_best, self.metric):
            st.stop_best, st.since_best = value, 0
        else:
            st.since_best += 1

    def _validate(self, epoch_no: int) -> dict[str, float]:
        # validation must not move the RNG streams, or a resumed run would differ from an uninterrupted one
        dev = self.ctx.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            metrics = evaluate_pairs(self.parts.model, D.shard(self.ctx.val_pairs, self.info), self.cfg, dev,
                                     self.ctx.precision, f"val {epoch_no}", self.ctx.show_progress and self.main,
                                     workers_option=None)  # capped in silence: the training's cap was said
        metrics = D.merge_across(metrics, self.info)
        self.last_degenerate = metrics.degenerate()
        if self.last_degenerate and self.main:
            warnings.warn(f"epoch {epoch_no}: the validation predictions are {for_every_image(self.last_degenerate)}: "
                          f"the model has not learnt the masks yet. {self._hints()}", stacklevel=2)
        return metrics.compute()

    def _hints(self) -> str:
        return self.parts.task.learning_hints(self.tc.lr)

    def _warn_if_flat(self) -> None:
        """The selection metric never moved over two or more validations: say so."""
        values = [float(r[f"val_{self.metric}"]) for r in read_metrics(self.run_dir / METRICS_FILE)
                  if r["kind"] == "epoch" and r.get(f"val_{self.metric}")]
        if len(values) >= 2 and max(values) - min(values) <= 1e-9:
            warnings.warn(f"validation {self.metric} stayed at {values[0]:.4f} in all {len(values)} validated epochs: "
                          f"the run learnt nothing measurable. {self._hints()}", stacklevel=2)
        elif self.last_degenerate:  # the metric may move on empty predictions (S-measure does): not learning
            warnings.warn(f"the final validation predictions are {for_every_image(self.last_degenerate)}, whatever "
                          f"{self.metric} says: the run has not learnt the masks. {self._hints()}", stacklevel=2)

    def _finish(self) -> None:
        if self.info.enabled:  # DDP keeps the processes in step; check it (cheap: once per run)
            digest = D.check_in_sync(trainable_state(self.parts.model), self.info)
            heads = self.parts.extra_modules
            if heads:  # the training-only modules (SLIP's heads) train inside the DDP wrapper too
                heads_digest = D.check_in_sync({f"{name}.{k}": p.detach() for name, m in heads.items()
                                                for k, p in m.named_parameters()}, self.info)
            if self.main:
                also = f" and training-only modules {', '.join(heads)} (sha256 {heads_digest})" if heads else ""
                console.print(f"all {self.info.world_size} processes hold identical trainable weights (sha256 {digest})"
                              f"{also}")
        D.barrier(self.info)
        if self.checkpointer.save_final_fallback(self.state):
            warnings.warn("no validation result was finite; adapter.safetensors holds the last weights", stacklevel=2)
        if self.main:
            self._warn_if_flat()

