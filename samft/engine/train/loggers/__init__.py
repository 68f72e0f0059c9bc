"""Where a training's metrics go besides ``metrics.csv``: TensorBoard and MLflow (``train.loggers``).

``metrics.csv`` (:mod:`samft.engine.artifacts.metrics_csv`) is the run's own record: ``--resume``, the curves
and ``samft report`` read it, so it is always written, whether ``csv`` is listed or not. Every row written to it
goes to each tracker, by :func:`scalars`: the column's name and the row's ``step`` (a step row's ``epoch``,
``lr``, ``loss``, ``task_loss``, ``aux_<name>``, ``grad_norm``, ``images_per_s``, ``seconds``; an epoch row's
``val_<metric>`` and its ``loss``, the mean over the epoch, as ``epoch_loss``). Besides: the run's config as
hyper-parameters, every ``train.log_images_every`` validations a few validation images with their true and
predicted masks (:mod:`samft.engine.train.loggers.images`), and, for MLflow, the best adapter as an artifact.

One interface (:class:`Tracker`), one module per tracker, each library imported only when asked for: without
it the training refuses to start in one line saying what to install (:func:`require`). Only the main process
logs under torchrun.

``--resume`` continues the same TensorBoard folder and MLflow run with every step once: TensorBoard hides what
was logged from the resumed step on (``purge_step``) and the rows ``metrics.csv`` kept from there are sent
again; MLflow receives the rows only once the resumable state that holds them is saved, and on resume the kept
rows it lacks are sent.

A tracker that fails (a store that cannot be written, a server that does not answer) is said once in one line
and dropped; the training goes on.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from samft.errors import SamftError

# logger -> (the package it needs, the extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}

Images = list[tuple[str, np.ndarray]]  # (name, RGB uint8 (H, W, 3))


def import_package(logger: str) -> Any:
    """The package ``logger`` needs, imported; else one line saying what to install. MLflow's usage telemetry
    is switched off first (``MLFLOW_DISABLE_TELEMETRY``, unless set): nothing reaches a network unless
    ``train.mlflow_uri`` names a server."""
    module, extra = PACKAGES[logger]
    if logger == "mlflow":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SamftError(f"train.loggers: {logger} needs the {module} package, which is not installed: "
                         f"pip install 'samft[{extra}]'") from None


def require(loggers: list[str]) -> None:
    """Every tracker asked for can be imported (checked before the run is written)."""
    for name in loggers:
        if name in PACKAGES:
            import_package(name)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``metrics.csv`` row by the name each tracker logs them under (see the module
    docstring); empty cells are left out."""
    epoch_row = row.get("kind") == "epoch"
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in ("kind", "step") or value is None or value == "" or (epoch_row and key == "epoch"):
            continue
        out["epoch_loss" if epoch_row and key == "loss" else key] = float(value)
    return out


def validated(row: dict[str, Any]) -> bool:
    """Whether a ``metrics.csv`` row is an epoch row with validation results."""
    return row.get("kind") == "epoch" and any(k.startswith("val_") and v not in ("", None) for k, v in row.items())


def warn_failed(name: str, error: BaseException) -> None:
    """The one line saying that a tracker failed and that the training goes on without it."""
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else ""
    warnings.warn(f"train.loggers: {name} failed ({type(error).__name__}: {first}); it logs nothing more in this "
                  f"run and the training goes on (metrics.csv has every row)", stacklevel=4)


class Tracker:
    """One place metrics go. ``replay_from``: on resume, the step from which the tracker has hidden what it had
    (TensorBoard): the kept rows from there are sent again; None for a tracker that keeps only saved rows.
    ``starts_empty``: whether it holds nothing of this run yet (then it is sent the config)."""

    name = ""
    replay_from: Optional[int] = None
    starts_empty = True

    def hparams(self, params: dict[str, Any], config_yaml: str, metric: str) -> None:
        """The run's config (flat dotted keys) as hyper-parameters; ``metric`` the selection metric's column."""

    def scalars(self, step: int, values: dict[str, float], walltime: float) -> None:
        """One row's scalars at ``step``."""

    def resume(self, kept: list[dict[str, Any]]) -> None:
        """On resume: the rows ``metrics.csv`` kept (those of the saved state)."""

    def commit(self) -> None:
        """The resumable state was saved: the rows so far are final."""

    def images(self, step: int, images: Images) -> None:
        """Validation images (image | truth | prediction) at ``step``."""

    def best(self, adapter: Path) -> None:
        """A new best adapter was written."""

    def close(self, status: str, files: list[Path]) -> None:
        """The training ended (``FINISHED``, ``KILLED`` or ``FAILED``); ``files``: the run's files to keep."""


class Trackers:
    """The trackers of one training, each call guarded: a tracker that raises is said once and dropped."""

    def __init__(self, trackers: list[Tracker], images_every: int = 0,
                 make_images: Optional[Callable[[], Images]] = None, validations: int = 0) -> None:
        self.active = list(trackers)
        self.images_every, self.make_images = images_every, make_images
        self.validations = validations  # validated epoch rows so far (images go every images_every of them)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            self._guarded(tracker, method, *args)

    def _guarded(self, tracker: Tracker, method: str, *args: Any) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 (a tracker never stops the training)
            self.drop(tracker, e)

    def drop(self, tracker: Tracker, error: BaseException) -> None:
        """Say in one line that ``tracker`` failed, and log nothing more to it."""
        warn_failed(tracker.name, error)
        self.active.remove(tracker)

    def hparams(self, params: dict[str, Any], config_yaml: str, metric: str) -> None:
        self._each("hparams", params, config_yaml, metric)

    def row(self, row: dict[str, Any]) -> None:
        """One row just written to ``metrics.csv``; after a validated epoch row, the images when due."""
        self._each("scalars", int(row["step"]), scalars(row), time.time())
        if validated(row):
            self.validations += 1
            self._images(int(row["step"]), self.active, self.validations)

    def _images(self, step: int, trackers: list[Tracker], validation: int) -> None:
        """The validation images of the ``validation``-th validation to ``trackers``, when due."""
        due = self.images_every and validation % self.images_every == 0
        if not (due and trackers and self.make_images):
            return
        images = self.make_images()
        for tracker in list(trackers):  # a failing one leaves self.active
            self._guarded(tracker, "images", step, images)

    def resume(self, kept: list[dict[str, Any]]) -> None:
        """Continue the trackers after ``--resume`` (see the module docstring): each gets the kept rows; one that
        hid steps from ``replay_from`` on has those rows sent again (and the images of a validation among them,
        drawn by the restored model: the weights of that step)."""
        self._each("resume", kept)
        count = 0
        for row in kept:
            count += validated(row)
            step = int(row["step"])
            replaying = [t for t in self.active if t.replay_from is not None and step >= t.replay_from]
            for tracker in replaying:
                self._guarded(tracker, "scalars", step, scalars(row), time.time())
            if validated(row) and replaying:
                self._images(step, replaying, count)
        self.validations = count

    def commit(self) -> None:
        self._each("commit")

    def best(self, adapter: Path) -> None:
        self._each("best", adapter)

    def close(self, status: str, files: list[Path]) -> None:
        self._each("close", status, files)
        self.active = []


def _make(name: str, cfg: Any, run_dir: Path, resume_step: Optional[int]) -> Tracker:
    from samft.engine.artifacts.rundir import TENSORBOARD_DIR

    if name == "tensorboard":
        from samft.engine.train.loggers.tensorboard_log import TensorBoardTracker

        return TensorBoardTracker(run_dir / TENSORBOARD_DIR, resume_step)
    from samft.engine.train.loggers.mlflow_log import MlflowTracker, default_uri

    return MlflowTracker(cfg.train.mlflow_uri or default_uri(run_dir), cfg.train.mlflow_experiment, run_dir,
                         resume_step is not None)


def open_trackers(cfg: Any, run_dir: Path, resume_step: Optional[int], kept: list[dict[str, Any]],
                  make_images: Optional[Callable[[], Images]], metric: str) -> Trackers:
    """The trackers of ``cfg.train.loggers`` for the run at ``run_dir`` (``csv`` is ``metrics.csv``, written by
    the loop): each sent the config when it starts empty, and on resume (``resume_step``: the saved state's
    step) the rows ``metrics.csv`` kept (``kept``). One that cannot start is said in one line and left out."""
    from samft.config import dump_yaml, flat_dict, to_dict

    hub = Trackers([], cfg.train.log_images_every, make_images)
    for name in cfg.train.loggers:
        if name not in PACKAGES:
            continue
        try:
            tracker = _make(name, cfg, Path(run_dir), resume_step)
        except SamftError:
            raise
        except Exception as e:  # noqa: BLE001 (an unreachable store never stops the training)
            where = (cfg.train.mlflow_uri or "the default store") if name == "mlflow" else "RUN/tensorboard"
            warn_failed(f"{name} ({where})", e)
            continue
        hub.active.append(tracker)
        if tracker.starts_empty:
            hub._guarded(tracker, "hparams", flat_dict(to_dict(cfg)), dump_yaml(cfg), metric)
    if resume_step is not None:
        hub.resume(kept)
    return hub


__all__ = ["Images", "PACKAGES", "Tracker", "Trackers", "import_package", "open_trackers", "require",
           "scalars", "validated", "warn_failed"]
