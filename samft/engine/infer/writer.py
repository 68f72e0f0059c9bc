"""Writing prediction files in background threads while the model computes the next batch.

Encoding a PNG (zlib) and ``fsync``-ing it release the GIL, so a few threads overlap them with the
model's forward pass. At most ``max_pending`` jobs wait, so memory stays bounded; the first job that fails
re-raises its error in the caller. On Ctrl-C (KeyboardInterrupt) the jobs handed over are finished before it
propagates; on any other error the waiting ones are dropped.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional


class BackgroundWriter:
    """``submit(fn, *args)`` runs ``fn`` on one of ``threads`` threads (0: at once, in the caller).

    Use as a context manager: leaving it waits for every job and raises the first error.
    """

    def __init__(self, threads: int = 2, max_pending: Optional[int] = None) -> None:
        self.threads = threads
        self.max_pending = max_pending or 4 * max(1, threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="samft-write") if threads > 0 else None
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)``; its Future (done at once with 0 threads) gives what it returned."""
        if self._pool is None:
            done: Future = Future()
            done.set_result(fn(*args))
            return done
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()  # raises the job's error
        self._pending.append(self._pool.submit(fn, *args))
        return self._pending[-1]

    def _finish_quietly(self) -> None:
        """Let every job handed over run; their errors give way to the interruption being raised."""
        while self._pending:
            try:
                self._pending.popleft().result()
            except Exception:  # noqa: BLE001  (the interruption is what the caller reports)
                pass

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C: what was handed over is finished, not dropped
                self._finish_quietly()
        finally:
            if self._pool is not None:
                for f in self._pending:
                    f.cancel()
                self._pool.shutdown(wait=True)
