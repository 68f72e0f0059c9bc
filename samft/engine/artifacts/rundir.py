"""Creating, claiming and locking a run directory.

samft writes only into a folder that does not exist, is empty, or that samft created (it holds the
``.samft-run`` marker, or a run of an earlier version: ``config.yaml`` with ``state.pt`` or an adapter).
``output.overwrite=true`` replaces a run samft created, deleting only samft's own files; it never makes a
folder of the user's writable. A start that fails before the run's first file removes what it created.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from samft.version import __version__
from samft.engine.artifacts.checkpoint import atomic_write_text
from samft.engine.artifacts.runs import (ADAPTER_FILE, CONFIG_FILE, EVAL_FILE, LAST_ADAPTER_FILE, LEGACY_STATE_FILE, MARKER_FILE,
                               METRICS_FILE, PLOT_FILE, RESUMES_FILE, SPLIT_FILE, STATE_FILE, state_file)
from samft.config import RESUMABLE_KEYS  # what --resume may change: opt(..., resumable=True) in the schema
from samft.errors import SamftError

LOCK_FILE = ".lock"
# what a training writes, deleted when a run is started again (a pruned run's pruned.safetensors and
# architecture.json are its base, written by samft prune before its training starts: they stay)
TRAINING_FILES = (STATE_FILE, LEGACY_STATE_FILE, ADAPTER_FILE, LAST_ADAPTER_FILE, METRICS_FILE, PLOT_FILE, EVAL_FILE,
                  SPLIT_FILE, RESUMES_FILE)


def is_samft_run(run_dir: Path) -> bool:
    """Whether samft created ``run_dir`` (marker, or an earlier version's run files)."""
    if (run_dir / MARKER_FILE).is_file():
        return True
    return (run_dir / CONFIG_FILE).is_file() and has_progress(run_dir)


def has_progress(run_dir: Path) -> bool:
    """Whether the run holds trained weights or a resumable state."""
    return state_file(run_dir).exists() or any((run_dir / f).exists() for f in (ADAPTER_FILE, LAST_ADAPTER_FILE))


def _user_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name not in (LOCK_FILE, MARKER_FILE))


def claim_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Check that a fresh training may write into ``run_dir``; returns whether the folder already existed.

    Raises when it holds a run (unless ``overwrite``) or files samft did not create (always).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise SamftError(f"output.dir {run_dir}: is a file, not a folder")
    if not run_dir.is_dir():
        return False
    files = _user_files(run_dir)
    if not files:
        return True
    if not is_samft_run(run_dir):
        raise SamftError(f"output.dir {run_dir}: holds files samft did not create ({', '.join(files[:3])}"
                         f"{' ...' if len(files) > 3 else ''}); choose an empty or new folder")
    if has_progress(run_dir) and not overwrite:
        raise SamftError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, choose another "
                         f"output.dir, or set output.overwrite=true to replace it")
    return True


def init_run_dir(run_dir: Path, config_yaml: str) -> None:
    """Clear samft's own files of an earlier run there, then write the marker and ``config.yaml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in TRAINING_FILES:
        (run_dir / name).unlink(missing_ok=True)
    atomic_write_text(run_dir / MARKER_FILE, json.dumps({"samft_version": __version__, "created": time.time()}))
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)


def remove_failed_start(run_dir: Path, existed: bool) -> None:
    """Undo :func:`init_run_dir` after a start that failed before saving anything."""
    if has_progress(run_dir):
        return
    for name in (CONFIG_FILE, MARKER_FILE, METRICS_FILE, SPLIT_FILE):
        (run_dir / name).unlink(missing_ok=True)
    if not existed:
        try:
            run_dir.rmdir()
        except OSError:
            pass  # something else is in it: leave it


def clean_stale_tmp(run_dir: Path) -> int:
    """Remove temporary files of atomic writes cut short by a kill (never renamed, never used)."""
    n = 0
    if run_dir.is_dir():
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
            n += 1
    return n


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


def record_resume(run_dir: Path, changes: dict[str, tuple[object, object]], step_hint: str, config_yaml: str) -> None:
    """Write the changed config into the run and append the change to ``resumes.jsonl``."""
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)
    entry = {"time": time.time(), "at": step_hint, "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
    with open(run_dir / RESUMES_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")
