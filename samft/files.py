"""Atomic file writes (torch-free, usable from every layer): write a temporary file, fsync, rename.

A reader sees the old file or the new one, never half of one. The temporary file is created new
(``O_EXCL | O_NOFOLLOW``: never opened through a link someone placed there) under a name only samft uses,
``.NAME.samft-PID.tmp`` (shortened with a hash when NAME is long, so that a legal file name never makes an
illegal temporary one); a kill leaves at most such a file, which the next training in a run folder samft
created removes (:func:`is_own_tmp`). The rename replaces a link at ``path`` itself, never its target.

Appends (:func:`append_text`) never follow a link either: a link at the appended file is refused in one
line. :func:`exclusive_lock` serialises a read-modify-write of one file across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from typing import Iterator

from samft.errors import SamftError

NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
_OWN_TMP = re.compile(r"^\..+\.samft-\d+\.tmp$")


def tmp_name(name: str, pid: int | None = None) -> str:
    """The temporary name for writing ``name``: ``.NAME.samft-PID.tmp``, within NAME_MAX bytes."""
    tail = f".samft-{os.getpid() if pid is None else pid}.tmp"
    full = f".{name}{tail}"
    if len(full.encode()) <= NAME_MAX:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    keep = NAME_MAX - len(tail.encode()) - len(digest) - 2
    head = name.encode()[:keep].decode(errors="ignore")
    return f".{head}~{digest}{tail}"


def is_own_tmp(name: str) -> bool:
    """Whether a file name is one of samft's temporary names (nothing else is ever cleaned)."""
    return bool(_OWN_TMP.match(name))


def _write_new(tmp: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_dir(folder: Path) -> None:
    """fsync a folder: the renames into it become durable (what :func:`atomic_write_bytes` does after each file
    unless told ``sync_folder=False``, for a caller that writes many files into few folders and syncs each once)."""
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes, sync_folder: bool = True) -> None:
    """Write ``data`` to a new file beside ``path``, fsync it, rename it onto ``path`` (a reader sees the old file or
    the whole new one, never a part), then fsync the folder (``sync_folder`` False: the caller does, once for
    many files: :func:`sync_dir`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name(path.name))
    if tmp.is_symlink() or tmp.exists():  # a leftover of this pid (or a planted link): never written through
        tmp.unlink()
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    if sync_folder:
        sync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (created when missing), never through a link: a symlink at ``path`` is
    refused with a one-line :class:`SamftError` naming the file, and its target is left as it was."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise SamftError(f"{path}: is a symlink; samft never writes a run's file through a link (remove the "
                             f"link, keeping its target's contents elsewhere if you need them)") from None
        raise SamftError(f"{path}: cannot append ({e.strerror or e})") from None
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (created, never through a link, and left in
    place: removing it would let a waiter lock a file nobody else sees) for the duration of a ``with``;
    waits for another holder."""
    import fcntl

    path = Path(path)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise SamftError(f"{path}: cannot create the lock file ({e.strerror or e}); is it a symlink?") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


MAX_JSON_DEPTH = 32  # JSON nested deeper than this is refused (samft never writes more than a few levels)


def json_depth(node: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of a parsed JSON value, counted up to ``limit + 1`` (iteratively: no recursion)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def parse_json(text: str | bytes, path: str | Path, what: str, error: type, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` of a file's text; damage and nesting deeper than ``max_depth`` raise ``error`` in one line
    naming the file."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise error(f"{path}: {what} is nested more than {max_depth} levels deep (damaged or not samft's)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from None
    if json_depth(data, max_depth) > max_depth:
        raise error(f"{path}: {what} is nested more than {max_depth} levels deep (damaged or not samft's)")
    return data
