"""A run directory: :class:`RunDir` owns its file names, the claim rule, the lock, loading and the
``eval.json`` path; every command that writes a run (train, prune, eval) goes through it.

samft writes only into a folder that does not exist, is empty, or that samft created (it holds the
``.samft-run`` marker, or a run of an earlier version: ``config.yaml`` with ``state.pt`` or an adapter).
``output.overwrite=true`` replaces a run samft created, deleting only samft's own files; it never makes a
folder of the user's writable. A start that fails before the run's first file removes what it created.

An exported model file (``samft export``: ``MODEL.pth``) stands for a run too (``RunDir(MODEL.pth)``):
it is loaded with its own config and its evaluation goes to ``MODEL.eval.json`` next to it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional

from samft.version import __version__
from samft.config import RESUMABLE_KEYS  # what --resume may change: opt(..., resumable=True) in the schema
from samft.engine.artifacts import per_image_csv, resumes, run_config
from samft.engine.artifacts.fileio import atomic_write_text
from samft.errors import SamftError
from samft.files import is_own_tmp

CONFIG_FILE = "config.yaml"
ADAPTER_FILE = "adapter.safetensors"  # best checkpoint (by train.metric)
LAST_ADAPTER_FILE = "adapter_last.safetensors"
STATE_FILE = "state.safetensors"  # the resumable state (never a pickle)
LEGACY_STATE_FILE = "state.pt"  # an earlier version's state: read with weights_only=True
METRICS_FILE = "metrics.csv"
EVAL_FILE = "eval.json"
PLOT_FILE = "curves.png"
SPLIT_FILE = "split.json"
MARKER_FILE = ".samft-run"  # a folder samft created
RESUMES_FILE = "resumes.jsonl"
ARCH_FILE = "architecture.json"  # a pruned run (samft prune): the architecture and what the search found
PRUNED_FILE = "pruned.safetensors"  # a pruned run: the pruned model's whole state (config key model.pruned)
LOCK_FILE = ".lock"
EVAL_LOCK_FILE = ".eval.json.lock"  # eval.json's read-merge-write (eval_json.update), separate from the training lock
TRACKERS_FILE = "trackers.json"  # the MLflow run this training logs to (train.loggers), for --resume
TENSORBOARD_DIR = "tensorboard"  # train.loggers=[tensorboard]: the event files (tensorboard --logdir RUN/..)

RUN_FILES = (CONFIG_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE, STATE_FILE, LEGACY_STATE_FILE, METRICS_FILE, EVAL_FILE,
             PLOT_FILE, SPLIT_FILE, RESUMES_FILE, MARKER_FILE, ARCH_FILE, PRUNED_FILE, LOCK_FILE, EVAL_LOCK_FILE,
             TRACKERS_FILE)
# what a training writes, deleted when a run is started again (a pruned run's pruned.safetensors and
# architecture.json are its base, written by samft prune before its training starts: they stay)
TRAINING_FILES = (STATE_FILE, LEGACY_STATE_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE, METRICS_FILE, PLOT_FILE, EVAL_FILE,
                  SPLIT_FILE, RESUMES_FILE, TRACKERS_FILE)
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # the only files of RUN/tensorboard/ samft removes


class RunDir:
    """One run directory (or an exported model file standing for one): its paths and the rules for
    writing into it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def exported(self) -> bool:
        """Whether this is an exported model file (``samft export``), not a folder."""
        return self.path.is_file()

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def split_path(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def eval_path(self) -> Path:
        """Where evaluating this run writes its results: ``RUN/eval.json``, or ``MODEL.eval.json`` next to
        an exported model file ``MODEL.pth``."""
        if self.exported:
            return self.path.with_name(self.path.stem + ".eval.json")
        return self.path / EVAL_FILE

    @property
    def per_image_dir(self) -> Path:
        """Where evaluating this run writes each set's per-image CSV (:mod:`samft.engine.artifacts.per_image_csv`):
        ``RUN/eval_per_image``, or ``MODEL.eval_per_image`` beside ``MODEL.eval.json``."""
        if self.exported:
            return self.path.with_name(self.path.stem + "." + per_image_csv.FOLDER)
        return self.path / per_image_csv.FOLDER

    @property
    def state_path(self) -> Path:
        """The run's resumable state: ``state.safetensors``, or an earlier version's ``state.pt``."""
        legacy = self.path / LEGACY_STATE_FILE
        return legacy if legacy.is_file() and not (self.path / STATE_FILE).is_file() else self.path / STATE_FILE

    def read_config(self, overrides: Optional[list[str]] = None):
        """The run's ``config.yaml`` (:mod:`samft.engine.artifacts.run_config`)."""
        if not self.config_path.is_file():
            raise SamftError(f"{self.path}: not a run directory ({CONFIG_FILE} not found)")
        return run_config.read(self.config_path, overrides)

    def load(self, device, adapter: str = ADAPTER_FILE):
        """The run's model (:func:`samft.engine.artifacts.loading.load_run`)."""
        from samft.engine.artifacts.loading import load_run

        return load_run(self.path, device, adapter)

    # --- claiming and writing -------------------------------------------------------------------

    def is_samft_run(self) -> bool:
        """Whether samft created this folder (marker, or an earlier version's run files)."""
        if (self.path / MARKER_FILE).is_file():
            return True
        return self.config_path.is_file() and self.has_progress()

    def has_progress(self) -> bool:
        """Whether the run holds trained weights or a resumable state."""
        return self.state_path.exists() or any((self.path / f).exists() for f in (ADAPTER_FILE, LAST_ADAPTER_FILE))

    def user_files(self) -> list[str]:
        """What is in the folder besides the lock, the marker and samft's own temporary files."""
        return sorted(p.name for p in self.path.iterdir()
                      if p.name not in (LOCK_FILE, EVAL_LOCK_FILE, MARKER_FILE) and not is_own_tmp(p.name)
                      and not _legacy_tmp(p.name))

    def claim(self, overwrite: bool, option: str = "output.dir",
              to_overwrite: str = "set output.overwrite=true") -> bool:
        """Check that a fresh training (or pruning) may write here; returns whether the folder existed.

        Raises when it holds a run (unless ``overwrite``) or files samft did not create (always, whatever
        ``overwrite``). ``option`` and ``to_overwrite`` name the command's own option in the messages.
        """
        if self.path.exists() and not self.path.is_dir():
            raise SamftError(f"{option} {self.path}: is a file, not a folder")
        if not self.path.is_dir():
            return False
        files = self.user_files()
        if not files:
            return True
        if not self.is_samft_run():
            raise SamftError(f"{option} {self.path}: holds files samft did not create ({', '.join(files[:3])}"
                             f"{' ...' if len(files) > 3 else ''}); choose an empty or new folder")
        if self.has_progress() and not overwrite:
            raise SamftError(f"{self.path}: already holds a run; continue it with --resume {self.path}, choose "
                             f"another {option}, or {to_overwrite} to replace it")
        return True

    def mark(self) -> None:
        """Create the folder and write the ``.samft-run`` marker (the folder is samft's from now on)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / MARKER_FILE, json.dumps({"samft_version": __version__, "created": time.time()}))

    def init(self, config_yaml: str) -> None:
        """Clear samft's own files of an earlier run here, then write the marker and ``config.yaml``."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in TRAINING_FILES:
            (self.path / name).unlink(missing_ok=True)
        per_image_csv.remove(self.per_image_dir)  # the earlier run's per-image results, with its eval.json
        self.remove_tensorboard()
        kept = [n for n in self.user_files() if n not in RUN_FILES]
        if kept:  # e.g. predictions/ of the replaced model: the user's, kept, but said
            warnings.warn(f"{self.path}: {', '.join(kept[:3])}{' ...' if len(kept) > 3 else ''} kept from the replaced "
                          f"run: not this run's outputs (move or delete them)", stacklevel=3)
        self.mark()
        run_config.write(self.config_path, config_yaml)

    def remove_failed_start(self, existed: bool) -> None:
        """Undo :meth:`init` after a start that failed before saving anything."""
        if self.has_progress():
            return
        for name in (CONFIG_FILE, MARKER_FILE, METRICS_FILE, SPLIT_FILE, TRACKERS_FILE):
            (self.path / name).unlink(missing_ok=True)
        self.remove_tensorboard()
        if not existed:
            try:
                self.path.rmdir()
            except OSError:
                pass  # something else is in it: leave it

    def remove_tensorboard(self) -> None:
        """Remove an earlier training's TensorBoard event files (``tensorboard/events.out.tfevents.*``, nothing
        else) and the folder when that empties it."""
        folder = self.path / TENSORBOARD_DIR
        if folder.is_dir() and not folder.is_symlink():
            for events in folder.glob(TENSORBOARD_EVENTS):
                if events.is_file() or events.is_symlink():
                    events.unlink()
            try:
                folder.rmdir()
            except OSError:
                pass  # something else is in it: leave it

    def clean_stale_tmp(self) -> int:
        """Remove samft's own temporary files of atomic writes cut short by a kill (never renamed, never used):
        ``.NAME.samft-PID.tmp`` (:func:`samft.files.is_own_tmp`), and an earlier version's ``.NAME.PID.tmp`` of
        a run file. Nothing else, whatever its name."""
        n = 0
        if self.path.is_dir():
            for stale in self.path.glob(".*.tmp"):
                if is_own_tmp(stale.name) or _legacy_tmp(stale.name):
                    stale.unlink(missing_ok=True)
                    n += 1
        return n

    def lock(self, enabled: bool = True) -> "RunLock":
        """An exclusive lock on this run for the duration of a ``with`` (see :class:`RunLock`)."""
        return RunLock(self.path, enabled)

    def record_resume(self, changes: dict[str, tuple[object, object]], step_hint: str, config_yaml: str) -> None:
        """Append the change to ``resumes.jsonl``, then write the changed config into the run.

        ``resumes.jsonl`` is appended without following a link (:func:`samft.files.append_text`): a symlink
        placed there is refused in one line before the config is rewritten, and its target is not touched.
        """
        entry = {"time": time.time(), "at": step_hint,
                 "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
        resumes.write(self.path / RESUMES_FILE, entry)
        run_config.write(self.config_path, config_yaml)


def eval_path(run: str | Path) -> Path:
    """Where evaluating ``run`` (a run directory or an exported model file) writes its results."""
    return RunDir(run).eval_path


def state_file(run_dir: str | Path) -> Path:
    """The run's resumable state (see :attr:`RunDir.state_path`)."""
    return RunDir(run_dir).state_path


def is_run_file(path: str | Path) -> bool:
    """Whether ``path`` (followed through links) is one of a run directory's own files (config.yaml,
    adapter*, state*, metrics.csv ...), which other commands must never write to."""
    path = Path(path).resolve()
    if not (path.parent / CONFIG_FILE).is_file():
        return False
    return path.name in RUN_FILES or path.name.startswith(("adapter", "state", ".state", ".adapter"))


def newest_run(root: str | Path = "runs") -> Path:
    """The most recently modified run directory (one holding an adapter) under ``root``."""
    root = Path(root)
    runs = [p.parent for p in root.glob(f"*/{ADAPTER_FILE}")] if root.is_dir() else []
    if not runs:
        raise SamftError(f"no run found under {root}/ (a run directory holds {ADAPTER_FILE}); pass --run DIR")
    return max(runs, key=lambda p: (p / ADAPTER_FILE).stat().st_mtime)


def read_run_config(run_dir: str | Path, overrides: Optional[list[str]] = None):
    """The config of the run at ``run_dir`` (``config.yaml``), with ``overrides`` applied."""
    return RunDir(run_dir).read_config(overrides)


class RunLock:
    """An exclusive lock on a run directory, so two trainings never write into the same run.

    The lock file is created without following a symlink (``O_NOFOLLOW``): a link planted at ``.lock``
    is refused instead of its target being truncated.
    """

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path, self.enabled, self.fd, self.made_dir = run_dir / LOCK_FILE, enabled, None, False

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        import fcntl

        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise SamftError(f"{self.path}: cannot create the run lock ({e.strerror}); is it a symlink?") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder before us may have removed the file between our open and our lock: then we hold a
            # lock on a file nobody else can see; only the lock on the file at the path counts
            if os.stat(self.path, follow_symlinks=False).st_ino != os.fstat(self.fd).st_ino:
                raise OSError("lock file replaced")
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise SamftError(f"{self.path.parent}: another samft process is training into this run directory") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
                if self.made_dir and not any(self.path.parent.iterdir()):
                    self.path.parent.rmdir()  # a start that failed before writing anything leaves no folder
            finally:
                os.close(self.fd)
                self.fd = None


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and key not in ("test",):
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def resume_changes(saved: object, wanted: object) -> dict[str, tuple[object, object]]:
    """The keys ``wanted`` changes against the run's ``saved`` config: {key: (old, new)}; ``output.*`` and
    ``train.progress`` (display only) aside.

    Raises naming the first key that may not change on resume (see :data:`RESUMABLE_KEYS`).
    """
    from samft.config import to_dict

    old, new = _flatten(to_dict(saved)), _flatten(to_dict(wanted))
    changes = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and not k.startswith("output.") and k != "train.progress"}
    refused = [k for k in changes if k not in RESUMABLE_KEYS]
    if refused:
        k = refused[0]
        raise SamftError(f"{k}: cannot change on --resume (the run was trained with {changes[k][0]!r}; the saved "
                         f"optimizer, schedule and weights continue from it). Keys that may change: "
                         f"{', '.join(RESUMABLE_KEYS)}. Start a new run for {k}={changes[k][1]!r}")
    return changes




def _legacy_tmp(name: str) -> bool:
    """An earlier version's temporary name of a run file: ``.NAME.PID.tmp`` with NAME one of RUN_FILES."""
    parts = name.split(".")
    return (len(parts) >= 4 and parts[0] == "" and parts[-1] == "tmp" and parts[-2].isdigit()
            and ".".join(parts[1:-2]) in RUN_FILES)
