"""Per-image results of ``samft eval``: one CSV per evaluated set, one row per image, worst first.

The files live in a folder of their own beside ``eval.json``: ``RUN/eval_per_image/<set>.csv``, or
``MODEL.eval_per_image/<set>.csv`` next to an exported model's ``MODEL.eval.json``. samft writes only into a
folder it created (it holds the ``.samft-per-image`` marker); a folder of that name that samft did not
create, or a link, is refused in one line. A set evaluated again replaces only its own file, as its entry
in ``eval.json``. Columns: ``image`` (the file name), ``path`` (the image's full path), then the metrics;
an empty cell is a metric undefined for that image (no scored pixel).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from pathlib import Path

from samft.engine.artifacts.fileio import atomic_write_text, check_number, fail
from samft.errors import SamftError

KIND = "per_image_csv"
FORMAT = "samft-per-image-csv-1"
FOLDER = "eval_per_image"
MARKER = ".samft-per-image"
FIRST_COLUMNS = ("image", "path")


def set_file_name(name: str) -> str:
    """``<set>.csv`` for a set name, made a safe file name: characters other than letters, digits, ``.``, ``_``
    and ``-`` become ``_`` and a changed name gets a short hash of the original (``a/b`` -> ``a_b-1f2e3d.csv``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    if safe != name or not safe:
        safe = f"{safe or 'set'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"
    return f"{safe}.csv"


def check_folder(folder: str | Path) -> None:
    """Refuse a ``folder`` that exists but is not samft's (a link, a file, or a folder without the marker)."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not (folder.is_dir() and (folder / MARKER).is_file())):
        raise SamftError(f"{folder}: exists and samft did not create it (no {MARKER} inside); samft eval writes "
                         f"its per-image results there: move it away")


def prepare_folder(folder: str | Path) -> Path:
    """Create ``folder`` with its marker, or check that an existing one is samft's; returns it."""
    folder = Path(folder)
    check_folder(folder)
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise SamftError(f"{folder}: cannot create the per-image results' folder ({e.strerror or e})") from None
        atomic_write_text(folder / MARKER, json.dumps({"format": FORMAT}))
    return folder


def remove(folder: str | Path) -> None:
    """Delete a folder of per-image results that samft created (its marker and its CSVs; the folder itself when
    nothing else is left in it); anything else is left alone."""
    folder = Path(folder)
    if folder.is_symlink() or not (folder / MARKER).is_file():
        return
    for f in folder.glob("*.csv"):
        if f.is_file() and not f.is_symlink():
            f.unlink()
    (folder / MARKER).unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # something else is in it: leave it


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write(path: str | Path, rows: list[dict], columns: list[str]) -> None:
    """Write ``rows`` (``image``, ``path`` and the metric ``columns``) atomically, in their order."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow([*FIRST_COLUMNS, *columns])
    for row in rows:
        out.writerow([_cell(row[c]) for c in (*FIRST_COLUMNS, *columns)])
    atomic_write_text(path, buf.getvalue())


def read(path: str | Path) -> list[dict]:
    """The rows, checked: ``image`` and ``path`` columns, numbers (or empty cells) in the others; metric
    cells as floats (NaN for empty)."""
    path = Path(path)
    if not path.is_file():
        fail(path, "per-image results not found")
    try:
        text = path.read_text()
        rows = list(csv.DictReader(io.StringIO(text)))
        header = next(csv.reader(io.StringIO(text)), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        fail(path, f"cannot read the per-image results ({e})")
    missing = [c for c in FIRST_COLUMNS if c not in header]
    if missing:
        fail(path, f"field {missing[0]!r} is missing from the header")
    for n, row in enumerate(rows, 1):
        if None in row or any(v is None for v in row.values()):
            fail(path, f"row {n}: has {'more' if None in row else 'fewer'} cells than the header (cut short?)")
        for key in header[len(FIRST_COLUMNS):]:
            try:
                value = float(row[key]) if row[key] != "" else float("nan")
            except ValueError:
                fail(path, f"row {n}: field {key!r} is {row[key][:20]!r}, expected a number")
            row[key] = check_number(value, path, f"row {n}: {key}") if not math.isnan(value) else value
    return rows
