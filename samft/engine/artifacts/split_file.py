"""``split.json``: the image (and mask) files of each split a run uses: {split: [[image, mask or null]]}."""

from __future__ import annotations

import json
from pathlib import Path

from samft.engine.artifacts.fileio import atomic_write_text, fail, read_json_file

KIND = "split_file"
FORMAT = "samft-split-1"


def read(path: str | Path) -> dict[str, list[list]]:
    """The splits in ``path``, checked: each a list of [image path, mask path or null]."""
    path = Path(path)
    data = read_json_file(path, "split file")
    if not isinstance(data, dict):
        fail(path, f"the split file holds a {type(data).__name__}, expected a mapping of splits")
    for name, pairs in data.items():
        if not isinstance(pairs, list):
            fail(path, f"field {name!r} is a {type(pairs).__name__}, expected a list of [image, mask] pairs")
        if not pairs and name in ("train", "val"):
            fail(path, f"field {name!r} is an empty list, expected at least one [image, mask] pair")
        for i, pair in enumerate(pairs):
            ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and \
                (pair[1] is None or isinstance(pair[1], str))
            if not ok:
                fail(path, f"field '{name}.{i}' is {str(pair)[:60]}, expected [image path, mask path or null]")
    return data


def write(path: str | Path, splits: dict[str, list]) -> None:
    """Write ``{split: [Pair, ...]}`` (pairs with ``image`` and ``mask``) atomically."""
    data = {name: [[str(p.image), str(p.mask) if p.mask else None] for p in pairs] for name, pairs in splits.items()}
    atomic_write_text(path, json.dumps(data, indent=1))
