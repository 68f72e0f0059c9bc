"""samft.data.workers.prefetched: the read-ahead thread of prediction and evaluation without loader processes."""

from __future__ import annotations

import threading
import time

import pytest

from samft.data.workers import prefetched
from samft.errors import DataError


def _threads() -> int:
    return sum(t.name == "samft-prefetch" for t in threading.enumerate())


def test_items_come_in_order_and_all_of_them():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))


def test_it_reads_ahead_while_the_consumer_works():
    produced: list[int] = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    it = prefetched(items(), depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) >= 3  # item 0 handed out, 1 and 2 waiting in the buffer
    assert list(it) == [1, 2, 3, 4]


def test_a_producer_error_is_raised_after_the_items_before_it_as_it_was():
    def items():
        yield 1
        yield 2
        raise DataError("bad.png: cannot read image: the file is corrupt")

    got = []
    with pytest.raises(DataError, match="^bad.png: cannot read image: the file is corrupt$"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]


def test_closing_early_stops_the_producer():
    before = _threads()
    it = prefetched(iter(range(10_000)), depth=2)
    assert next(it) == 0
    it.close()
    assert _threads() == before
