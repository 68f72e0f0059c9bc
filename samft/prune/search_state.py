"""A search's resumable state (``search_state.pt``): written atomically every ``every`` steps, read with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only; never unpickled).

It holds the whole searching model's state (thresholds, head_probs, the search BatchNorms and their
statistics, the run's trained parameters), both optimizers' states, the step, lambda, the history and
the torch RNG state (the gates' Bernoulli samples). The data order is not stored: the loader is rebuilt
from the same seed and the batches before the saved step are skipped, so a resumed search takes the
same steps as an uninterrupted one. ``identity`` (the source run, target, steps, learning rates ...)
must match, so a state is never continued under other settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from samft.errors import load_failure
from samft.prune.errors import PruneError

SEARCH_STATE_FORMAT = "samft-search-state-1"


@dataclass
class SearchCheckpoint:
    """Where and how often a search saves its state, and what it must have been saved by. ``write(obj,
    path)`` writes atomically (the engine passes ``samft.engine.artifacts.fileio.atomic_torch_save``)."""

    path: Path
    every: int
    write: Callable[[Any, Path], None]
    identity: dict[str, Any] = field(default_factory=dict)

    def due(self, done: int, steps: int) -> bool:
        return self.every > 0 and done % self.every == 0 and done < steps


def save_search_state(ckpt: SearchCheckpoint, done: int, model: nn.Module, opt_arch: torch.optim.Optimizer,
                      opt_w: Optional[torch.optim.Optimizer], lam: Optional[float], history: list[dict]) -> None:
    ckpt.write({
        "format": SEARCH_STATE_FORMAT, "identity": dict(ckpt.identity), "step": done, "lam": lam,
        "history": [dict(r) for r in history], "model": model.state_dict(), "opt_arch": opt_arch.state_dict(),
        "opt_w": opt_w.state_dict() if opt_w is not None else None, "rng": torch.get_rng_state(),
    }, ckpt.path)


def load_search_state(ckpt: SearchCheckpoint) -> Optional[dict[str, Any]]:
    """The saved state, or None when there is none; a PruneError when it is unreadable or foreign."""
    if not ckpt.path.is_file():
        return None
    try:
        data = torch.load(ckpt.path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a readable search state"
        raise PruneError(f"{ckpt.path}: not a readable search state ({load_failure(e)})") from None
    if not isinstance(data, dict) or data.get("format") != SEARCH_STATE_FORMAT:
        raise PruneError(f"{ckpt.path}: not a samft search state")
    saved = data.get("identity", {})
    changed = {k: (saved.get(k), v) for k, v in ckpt.identity.items() if saved.get(k) != v}
    if changed:
        key, (was, now) = next(iter(changed.items()))
        raise PruneError(f"{ckpt.path}: saved by a search with {key}={was!r}, this one has {now!r}: resume with the "
                         f"same settings, or delete the file to search again")
    return data


def restore_search_state(data: Optional[dict], model: nn.Module, opt_arch: torch.optim.Optimizer,
                         opt_w: Optional[torch.optim.Optimizer], lam: Optional[float]):
    """(start step, lambda, history, RNG state to set at the start step) after loading ``data`` (or the
    fresh values when ``data`` is None)."""
    if data is None:
        return 0, lam, [], None
    try:
        model.load_state_dict(data["model"], strict=True)
        opt_arch.load_state_dict(data["opt_arch"])
        if opt_w is not None and data["opt_w"] is not None:
            opt_w.load_state_dict(data["opt_w"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PruneError(f"the saved search state does not fit this model: {str(e).splitlines()[0]}") from None
    return int(data["step"]), data["lam"], list(data["history"]), data["rng"]
