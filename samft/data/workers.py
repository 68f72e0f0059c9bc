"""How many data-loading processes a DataLoader gets: the one rule of evaluation, prediction, training and
``samft data check``."""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional


def cap_workers(asked: int, items: int, batch_size: int = 1, option: Optional[str] = "data.num_workers") -> int:
    """Data-loading processes for ``items`` inputs in batches of ``batch_size``: ``asked``, at most one per CPU
    this process may use and one per batch (a process more only forks and waits). When capped, one warning
    line names ``option`` (where the number came from); ``option`` None caps in silence (a loader whose cap
    was already said)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # usable
    batches = math.ceil(items / max(1, batch_size))
    workers = max(0, min(asked, cpus, batches))
    if workers < asked and option is not None:
        why = f"this process may use {cpus} CPU(s)" if workers == cpus else f"there are {batches} batch(es) to load"
        warnings.warn(f"{option}={asked}: using {workers} data-loading process(es), as {why}", stacklevel=2)
    return workers
