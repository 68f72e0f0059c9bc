"""The run's saved state during training: the resumable state, the last and the best adapters.

- ``state`` (every ``train.save_every`` steps and at each epoch end): trainable tensors, optimizer,
  scheduler, scaler, the loop's counters, the RNG states and the rows of ``metrics.csv`` written so far,
  and the extra streams' training-only modules (the SSL head: never in an adapter file).
- ``adapter_last.safetensors``: the trainable tensors of the same moment.
- ``adapter.safetensors``: the best epoch by the selection metric (ties: the later epoch wins, so a
  metric that never moves keeps the latest weights, and the choice is said in the metadata).

Every file is written atomically; on resume the best adapter may be newer than the state (a kill
between the two writes) and is reconciled.
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from samft.version import __version__
from samft.engine.artifacts.state import load_resume_state, save_resume_state, set_rng_state
from samft.engine.artifacts.adapter import load_trainable, read_adapter, save_adapter, trainable_state
from samft.engine.artifacts.rundir import ADAPTER_FILE, LAST_ADAPTER_FILE, STATE_FILE, state_file
from samft.errors import CheckpointError, SamftError
from samft.tasks.metrics import higher_is_better


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
    streams: dict = field(default_factory=dict)  # extra stream name -> {"epoch", "consumed"}
    log_rows: Optional[int] = None  # metrics.csv data rows written when this state was saved
    since_best: int = 0  # validations in a row without improvement of the metric (train.patience)
    stop_best: Optional[float] = None  # the value they did not improve on (the state's own: never reconciled)


def better(value: float, best: Optional[float], metric: str) -> bool:
    """Whether ``value`` should replace ``best``: strictly better, or equal (ties go to the later epoch)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value >= best if higher_is_better(metric) else value <= best


def improved(value: float, best: Optional[float], metric: str) -> bool:
    """Whether ``value`` improves on ``best`` for early stopping: strictly better (a tie is no improvement)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best if higher_is_better(metric) else value < best


class Checkpointer:
    """Writes (rank 0 only) and restores the run's state; see the module docstring."""

    def __init__(self, run_dir: Path, parts: Any, meta: dict[str, str], metric: str, enabled: bool) -> None:
        self.run_dir, self.parts, self.meta, self.metric, self.enabled = run_dir, parts, meta, metric, enabled

    def _guard(self, what: str):
        return _DiskGuard(self.run_dir, what)

    def save(self, state: TrainState, rng: dict, log_rows: int, streams: dict) -> None:
        """The resumable state and the last adapter, as of the last completed step."""
        if not self.enabled:
            return
        p = self.parts
        with self._guard("the resumable state"):
            save_adapter(p.model, self.run_dir / LAST_ADAPTER_FILE,
                         {**self.meta, "step": str(state.step), "epoch": str(state.epoch)})
            progress = {**state.__dict__, "rng": rng, "log_rows": log_rows, "streams": streams}
            save_resume_state(self.run_dir / STATE_FILE, {
                "samft_version": __version__,
                "trainable": {k: v.cpu().clone() for k, v in trainable_state(p.model).items()},
                "optimizer": p.optimizer.state_dict(),
                "scheduler": p.scheduler.state_dict(),
                "scaler": p.scaler.state_dict() if p.scaler.is_enabled() else None,
                "progress": progress,
                "extra_modules": {name: {k: v.cpu().clone() for k, v in m.state_dict().items()}
                                  for name, m in p.extra_modules.items()},
            })

    def offer_best(self, state: TrainState, epoch: int, value: float) -> bool:
        """Keep ``value`` of ``epoch`` as the best when it is (see :func:`better`); returns whether it was."""
        if not better(value, state.best_value, self.metric):
            return False
        tie = state.best_value is not None and value == state.best_value
        state.best_value, state.best_epoch = value, epoch
        if self.enabled:
            with self._guard("the best adapter"):
                save_adapter(self.parts.model, self.run_dir / ADAPTER_FILE, {
                    **self.meta, "step": str(state.step), "epoch": str(epoch), "metric": self.metric,
                    "best_value": repr(value), "selected_by": "tie, later epoch" if tie else "best"})
        return True

    def save_final_fallback(self, state: TrainState) -> bool:
        """No finite validation result: the last weights become ``adapter.safetensors``; returns whether written."""
        if not self.enabled or (self.run_dir / ADAPTER_FILE).exists():
            return False
        with self._guard("the adapter"):
            save_adapter(self.parts.model, self.run_dir / ADAPTER_FILE,
                         {**self.meta, "step": str(state.step), "epoch": str(state.epoch)})
        return True

    def restore(self) -> TrainState:
        """Load the saved state into the parts and the RNGs; returns the loop's counters."""
        p = self.parts
        path = state_file(self.run_dir)
        saved = load_resume_state(path)
        load_trainable(p.model, saved["trainable"], str(path))
        try:  # a state edited by hand or from another run: one line, not a traceback
            p.optimizer.load_state_dict(saved["optimizer"])
            p.scheduler.load_state_dict(saved["scheduler"])
            if saved.get("scaler"):
                p.scaler.load_state_dict(saved["scaler"])
            _restore_modules(p.extra_modules, saved.get("extra_modules") or {}, path)
            state = TrainState(**saved["progress"])  # an unknown key (a tampered or newer state) is refused
            set_rng_state(state.rng)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{path}: does not fit this run ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        best_path = self.run_dir / ADAPTER_FILE
        if best_path.is_file():  # the best adapter may be newer than the state (killed in between)
            best_meta = read_adapter(best_path)[1]
            if "best_value" in best_meta and int(best_meta.get("epoch", -1)) > state.best_epoch:
                state.best_value, state.best_epoch = float(best_meta["best_value"]), int(best_meta["epoch"])
        return state


def _restore_modules(modules: dict, saved: dict, source: Path) -> None:
    """Load the extra streams' training-only modules (e.g. the SSL head) saved in the state."""
    if set(modules) != set(saved):
        raise CheckpointError(f"{source}: the saved training-only modules {sorted(saved)} do not match this run's "
                         f"{sorted(modules)} (a loss that needs one was switched on or off since)")
    for name, module in modules.items():
        try:
            module.load_state_dict(saved[name])
        except RuntimeError as e:
            raise CheckpointError(f"{source}: the saved {name!r} module does not fit ({str(e).splitlines()[0]})") from None


class _DiskGuard:
    """Turn a full disk into one line naming the folder (the run stays resumable from its last save)."""

    def __init__(self, run_dir: Path, what: str) -> None:
        self.run_dir, self.what = run_dir, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SamftError(f"{self.run_dir}: no space left on the device while writing {self.what}; free some "
                             f"space and continue with: samft train --resume {self.run_dir}") from None
        return False


def resumed_text_embeddings(run_dir: Path, cfg) -> Optional[torch.Tensor]:
    """The class-name embeddings a resumed run trained with (``model.class_head=text``), from its last adapter
    (written with every state), or None (the head then reads ``model.text`` and the state's copy replaces it)."""
    from samft.slip.text import TEXT_EMB_KEY

    path = Path(run_dir) / LAST_ADAPTER_FILE
    if cfg.model.class_head != "text" or not path.is_file():
        return None
    saved = read_adapter(path)[0].get(TEXT_EMB_KEY)
    _warn_if_source_changed(cfg, saved)
    return saved


def _warn_if_source_changed(cfg, saved: Optional[torch.Tensor]) -> None:
    """One line when ``model.text.embeddings`` (a file, cheap to read) no longer holds the embeddings the run
    trained with: the run resumes with its own copy."""
    import warnings

    import torch.nn.functional as F

    from samft.errors import DataError
    from samft.slip.text import load_class_embeddings

    source = cfg.model.text.embeddings
    if saved is None or not source or not Path(source).expanduser().is_file():
        return
    try:
        now = F.normalize(load_class_embeddings(source, len(cfg.data.classes)), dim=-1)
    except DataError:
        now = None
    if now is None or now.shape != saved.shape or not torch.allclose(now, saved.float(), atol=1e-6):
        warnings.warn(f"model.text.embeddings {source} has changed since this run started; it resumes with the "
                      f"class-name embeddings it trained with (saved in the run)", stacklevel=3)
