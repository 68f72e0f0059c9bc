"""torch.distributed under ``torchrun``: set up from RANK / WORLD_SIZE / LOCAL_RANK (nanoGPT style).

NCCL on GPUs, gloo on CPU. A single process without those variables runs undistributed. Only rank 0
logs, plots and writes files.

When one process fails, torchrun stops the others. The failing process reports its error itself
(printed with its rank, and written to torchrun's error file by :func:`record_error` so that torchrun's
failure summary shows the message) and exits without waiting for the others.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank)


def cleanup(graceful: bool = True) -> None:
    """Destroy the process group after a successful run. After a failure it is left to the process
    exit: destroying it can wait on collectives that the other processes will never finish."""
    if graceful and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device_name: str = "auto") -> Iterator[DistInfo]:
    """``with distributed(device) as info:`` the process group of a torchrun launch for the duration.

    Sets it up (:func:`setup`) unless one exists already (a caller's: a training's validation, a test), and
    tears down only a group it created itself, after the body succeeded (:func:`cleanup`); after a
    failure the group is left to the process exit.
    """
    owns_group = not is_initialized()
    info = setup(device_name)
    ok = False
    try:
        yield info
        ok = True
    finally:
        if owns_group:
            cleanup(graceful=ok)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each process on its own GPU under torchrun."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def shard(items: list, info: DistInfo) -> list:
    """This rank's share of an evaluation list: every item exactly once across ranks."""
    return items[info.rank :: info.world_size] if info.enabled else items


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """All ranks' ``obj`` on every rank (a single-element list when undistributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def merge_across(metrics: Any, info: DistInfo) -> Any:
    """Every rank's metrics accumulator (an object with ``merge``) merged into one, on every rank."""
    parts = gather_objects(metrics, info)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    return merged


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when any rank raised the flag (used to stop all ranks together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over named tensors (sorted by name, exact bytes): equal digests mean identical weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(tensors: Mapping[str, torch.Tensor], info: DistInfo) -> str:
    """The digest of ``tensors``, checked to be the same on every rank (a SamftError names the ranks)."""
    from samft.errors import SamftError

    digest = tensors_sha256(tensors)
    digests = gather_objects(digest, info)
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        detail = "; ".join(f"ranks {ranks}: {d[:12]}" for d, ranks in groups.items())
        raise SamftError(f"the {info.world_size} processes ended with different weights ({detail}); "
                         "this is a bug, please report it")
    return digest


def record_error(message: str) -> None:
    """Write ``message`` to torchrun's error file (when launched by torchrun), so that torchrun's failure
    summary shows it instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass
