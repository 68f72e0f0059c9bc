"""Writing the report page: atomically, and never onto a file samft did not write unless ``overwrite``.

A page samft wrote carries ``<meta name="generator" content="samft report ...">`` near its top; such a file is
replaced. Any other existing file is refused in one line (``--overwrite`` replaces it), and a run's own files
(``config.yaml``, ``metrics.csv``, ...) are refused whatever ``overwrite`` says. A link at the output is replaced
itself, never written through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from samft.engine.artifacts.rundir import is_run_file
from samft.errors import SamftError
from samft.files import atomic_write_text
from samft.report.build import DEFAULT_K, GENERATOR, build_report

REPORT_FILE = "report.html"
HEAD_BYTES = 4096  # the generator meta is in the first lines of a page samft wrote


def default_out(runs: list[str | Path]) -> Path:
    """``RUN/report.html`` for one run; ``report.html`` in the working folder for several."""
    return Path(runs[0]) / REPORT_FILE if len(runs) == 1 else Path(REPORT_FILE)


def is_own_report(path: Path) -> bool:
    """Whether ``path`` is a report page samft wrote (its generator meta in the first bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}'.encode() in head


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output samft must not write (see the module docstring), before any work is done."""
    if out.is_dir():
        raise SamftError(f"--out {out}: is a folder; give the page's file name (e.g. {out / REPORT_FILE})")
    if is_run_file(out):
        raise SamftError(f"--out {out}: is one of a run's own files; choose another name (e.g. {REPORT_FILE})")
    exists = out.exists() or out.is_symlink()
    if exists and not overwrite and not (out.is_file() and not out.is_symlink() and is_own_report(out)):
        raise SamftError(f"--out {out}: exists and is not a report samft wrote; choose another name or pass "
                         f"--overwrite to replace it")
    if not out.parent.is_dir():
        raise SamftError(f"--out {out}: folder {out.parent} does not exist")


def write_report(runs: list[str | Path], out: Optional[str | Path] = None, *, overwrite: bool = False,
                 k: int = DEFAULT_K, predict: bool = True, device: str = "auto", data: Optional[dict[str, str]] = None,
                 show_progress: bool = True, title: str = "") -> Path:
    """Build the report of ``runs`` (:func:`samft.report.build_report`) and write it to ``out`` (default
    :func:`default_out`); returns the path written."""
    if not runs:
        raise SamftError("samft report needs at least one run directory")
    if k < 0:
        raise SamftError(f"--k {k}: expected 0 or more images")
    target = Path(out) if out is not None else default_out(runs)
    check_out(target, overwrite)
    html = build_report(runs, k=k, predict=predict, device=device, data=data, show_progress=show_progress,
                        title=title)
    check_out(target, overwrite)  # again: something may have appeared there while the report was built
    atomic_write_text(target, html)
    return target
