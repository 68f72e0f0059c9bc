"""Split files: ``{split: [[image, mask], ...]}`` as JSON — a run's ``split.json`` and a user's
``data.split_file``. One reader for both, used by training, ``data check`` and the run's files alike, so what
``data check`` passes training can read: a mapping of lists of [image path, mask path] pairs, nested no deeper
than samft writes, and ``train`` and ``val`` non-empty with a mask for every image (a null mask is refused
here, not at the first validation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samft.errors import DataError
from samft.files import atomic_write_text, parse_json

FORMAT = "samft-split-1"
NEEDED = ("train", "val")


def _check_pair(path: Path, name: str, i: int, pair: Any) -> None:
    ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)
    if not ok:
        raise DataError(f"{path}: field '{name}.{i}' is {str(pair)[:60]}, expected [image path, mask path]")


def read(path: str | Path) -> dict[str, list[list[str]]]:
    """The splits in ``path``, checked (see the module docstring); a DataError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        data = parse_json(path.read_bytes(), path, "the split file", DataError)
    except OSError as e:
        raise DataError(f"{path}: cannot read the split file ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the split file holds a {type(data).__name__}, expected a mapping of splits")
    for name in NEEDED:
        if name not in data:
            raise DataError(f"{path} is not a split.json (lists 'train' and 'val' of [image, mask]): field {name!r} "
                            f"is missing")
    for name, pairs in data.items():
        if not isinstance(pairs, list):
            raise DataError(f"{path}: field {name!r} is a {type(pairs).__name__}, expected a list of [image, mask] "
                            f"pairs")
        if not pairs and name in NEEDED:
            raise DataError(f"{path}: the {name!r} list is empty; expected at least one [image, mask] pair")
        for i, pair in enumerate(pairs):
            _check_pair(path, name, i, pair)
    return data


def write(path: str | Path, splits: dict[str, list]) -> None:
    """Write ``{split: [Pair, ...]}`` (pairs with ``image`` and ``mask``) atomically."""
    data = {name: [[str(p.image), str(p.mask)] for p in pairs] for name, pairs in splits.items()}
    atomic_write_text(path, json.dumps(data, indent=1))
