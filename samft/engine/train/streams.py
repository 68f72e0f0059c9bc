"""Data streams of a training, each resumable exactly.

The labelled stream defines the epochs: its order comes from (seed, epoch) through a
``DistributedSampler`` and each sample's augmentation from (seed, epoch, index), so resuming is skipping
the micro-batches an epoch already consumed (:class:`SkipSampler`). Extra streams (:class:`StreamCursor`)
cycle through their own epochs alongside; their position (epoch, samples consumed) is part of the saved
state, so they resume exactly too. Every loader gets its own generator: a DataLoader iterator would
otherwise draw from the global torch RNG and shift the gate noise of a resumed run.
"""

from __future__ import annotations

import zlib
from itertools import islice
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from samft.data.workers import cap_workers
from samft.engine import distributed as D


class SkipSampler(Sampler):
    """Yield ``sampler``'s indices after skipping the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def epoch_loader(dataset: Any, sampler: DistributedSampler, epoch: int, skip: int, batch_size: int,
                 num_workers: int, collate: Optional[Callable], pin_memory: bool, drop_last: bool = False
                 ) -> DataLoader:
    """A loader over one epoch of ``dataset`` from sample ``skip`` on (``drop_last``: no incomplete batch)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=SkipSampler(sampler, skip), num_workers=num_workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory, generator=torch.Generator())


def stream_seed(seed: int, name: str) -> int:
    """The order seed of a named extra stream (stable across runs and Python versions)."""
    return (seed + zlib.crc32(name.encode())) % (2**31)


class StreamCursor:
    """An endless, resumable iterator over an extra stream's batches."""

    def __init__(self, name: str, dataset: Any, batch_size: int, seed: int, info: D.DistInfo, num_workers: int,
                 collate: Optional[Callable], pin_memory: bool, position: Optional[dict] = None,
                 drop_last: bool = False) -> None:
        if len(dataset) == 0:
            from samft.errors import DataError

            raise DataError(f"data stream {name!r} is empty")
        self.name, self.dataset, self.batch_size = name, dataset, batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=stream_seed(seed, name))
        self.collate, self.pin_memory, self.drop_last = collate, pin_memory, drop_last
        self.num_workers = cap_workers(num_workers, len(self.sampler), batch_size)
        if drop_last and len(self.sampler) < batch_size:
            from samft.errors import DataError

            raise DataError(f"data stream {name!r}: {len(self.sampler)} item(s) per process, fewer than one full "
                            f"batch of {batch_size}")
        position = position or {}
        self.epoch, self.consumed = int(position.get("epoch", 0)), int(position.get("consumed", 0))
        self._iter: Optional[Iterator] = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def next(self) -> Any:
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(epoch_loader(self.dataset, self.sampler, self.epoch, self.consumed, self.batch_size,
                                               self.num_workers, self.collate, self.pin_memory, self.drop_last))
            batch = next(self._iter, None)
            if batch is not None:
                self.consumed += len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch)
                return batch
            self.epoch, self.consumed, self._iter = self.epoch + 1, 0, None
        raise RuntimeError(f"data stream {self.name!r} yields no batch")  # pragma: no cover (non-empty checked)
