"""Rich progress bars and console output (on stderr, so ``--json`` output stays clean)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True, highlight=False, soft_wrap=True)  # never hard-wrapped: a log line stays one line


PLAIN_EVERY_S = float(os.environ.get("SAMFT_PROGRESS_EVERY", "30"))


class PlainProgress:
    """Progress as plain lines every ``every`` seconds (output is a file or a pipe: nohup, a redirect, CI):
    ``epoch 1/20: 120/400 (30%) | 2.1 it/s | ETA 2m13s | loss 0.4123``."""

    def __init__(self, description: str, total: int, every: float, write: Callable[[str], None]) -> None:
        self.description, self.total, self.every, self.write = description, total, every, write
        self.done, self.info = 0, ""
        self.start = self.last = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        info = f" | {self.info}" if self.info else ""
        return f"{self.description}: {self.done}/{self.total}{pct} | {rate:.2f} it/s | ETA {eta_s}{info}"

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.done += n
        if info is not None:
            self.info = info
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.write(self.line())


@contextmanager
def progress(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1, info=None)``; a no-op when disabled (non-zero ranks, tests).

    On a terminal: a rich progress bar. Otherwise (a file, a pipe): a plain line every
    ``SAMFT_PROGRESS_EVERY`` seconds (default 30) and one at the end.
    """
    if not enabled:
        yield lambda n=1, info=None: None
        return
    if not console.is_terminal:
        plain = PlainProgress(description, total, PLAIN_EVERY_S, lambda line: console.print(line, soft_wrap=True))
        yield plain.advance
        console.print(plain.line() + " done", soft_wrap=True)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
