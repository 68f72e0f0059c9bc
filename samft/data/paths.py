"""Expanding glob patterns without following a symlink loop.

Python's ``glob.glob(pattern, recursive=True)`` follows every link to a folder under ``**``: a link that points
back up (``sub/up -> ..``) makes it walk for ever. :func:`expand_glob` walks the folders itself, follows links
to folders (a user's data often lies behind them) but enters each real folder once per chain of ancestors, and
returns the links it did not enter so that the caller can say so in one line.

Pattern rules are glob's: ``*``, ``?`` and ``[...]`` match within one path component, ``**`` matches any
number of components (zero included), and names starting with ``.`` are matched only by a pattern component
that starts with ``.``.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path


def has_magic(pattern: str) -> bool:
    """Whether ``pattern`` holds a wildcard (glob's rule)."""
    return glob.has_magic(pattern)


def _root(parts: tuple[str, ...]) -> tuple[Path, tuple[str, ...]]:
    """The fixed folder before the first component with a wildcard, and the components from there on."""
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return Path(*parts[:i]) if i else Path("."), parts[i:]
    return Path(*parts), ()


def _matches(rel: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether the path components ``rel`` match the pattern components (``**`` = any number of them)."""
    if not pattern:
        return not rel
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rel[i:], rest) for i in range(len(rel) + 1)
                   if all(not c.startswith(".") for c in rel[:i]))
    if not rel or (rel[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(rel[0], head) and _matches(rel[1:], rest)


def _walk(root: Path) -> tuple[list[tuple[str, ...]], list[Path]]:
    """Every file under ``root`` as components relative to it, and the links to folders not entered (loops)."""
    files: list[tuple[str, ...]] = []
    loops: list[Path] = []
    stack = [(root, (), frozenset({os.path.realpath(root)}))]
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # unreadable: as glob, nothing from there
        for entry in entries:
            if not entry.is_dir():
                if entry.is_file():
                    files.append((*rel, entry.name))
                continue
            real = os.path.realpath(entry.path)
            if real in ancestors:
                loops.append(Path(entry.path))
                continue
            stack.append((Path(entry.path), (*rel, entry.name), ancestors | {real}))
    return files, loops


def expand_glob(pattern: str) -> tuple[list[Path], list[Path]]:
    """(the files matching ``pattern``, sorted; the links to folders that were not entered because they lead
    back to one of their own ancestors)."""
    path = Path(pattern).expanduser()
    root, rest = _root(path.parts)
    if not rest:
        return ([path] if path.is_file() else []), []
    if not root.is_dir():
        return [], []
    depth_free = "**" in rest
    if not depth_free and len(rest) == 1:  # one level: no walk below the root
        names = sorted(e.name for e in os.scandir(root) if e.is_file())
        return [root / n for n in names if _matches((n,), rest)], []
    rels, loops = _walk(root)
    if not depth_free:
        rels = [r for r in rels if len(r) == len(rest)]
    return sorted(root.joinpath(*r) for r in rels if _matches(r, rest)), loops
