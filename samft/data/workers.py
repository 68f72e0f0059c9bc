"""How many data-loading processes a DataLoader gets: the one rule of evaluation, prediction, training and
``samft data check``."""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from typing import Iterable, Iterator, Optional

from samft.errors import SamftError


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


def one_line(error: SamftError) -> SamftError:
    """A samft error raised inside a DataLoader worker, as its one line again: torch re-raises it in the main
    process with the worker's whole traceback in the message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."), which the CLI would print as 20-30 lines."""
    text = str(error)
    if "Original Traceback" not in text:
        return error
    last = text.rstrip().splitlines()[-1]
    name = type(error).__name__
    message = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return type(error)(message)


def surfaced(batches: Iterable) -> Iterator:
    """Iterate a DataLoader; a samft error from a worker surfaces as its own one line (:func:`one_line`)."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except SamftError as e:
            raise one_line(e) from None
        yield item


_DONE = object()


def prefetched(items: Iterable, depth: int = 2) -> Iterator:
    """``items`` produced ``depth`` ahead on a background thread, in order: with no loader processes the next
    batch is decoded and resized (PIL, OpenCV and NumPy let go of the GIL) while the model runs on this one.
    An error of the producer is raised here, as it was raised there; closing the iterator early stops the
    producer at its next item."""
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            buffer.put((_DONE, e))

    worker = threading.Thread(target=produce, name="samft-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
