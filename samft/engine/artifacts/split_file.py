"""``split.json``: the image and mask files of each split a run uses, {split: [[image, mask]]}. Its reader and
writer are the data layer's (:mod:`samft.data.split_file`), shared with ``data.split_file`` and ``data check``."""

from __future__ import annotations

from samft.data.split_file import FORMAT, read, write  # noqa: F401  (the run file kind's reader and writer)

KIND = "split_file"
