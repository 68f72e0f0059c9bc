"""The gates' order, and the architecture that meets a GMACs target by it, however short the search.

A search learns an order more than an architecture: every pruning step has a score, how much the
thresholds say what it removes is worth (``theta``; the keep probability ``sigmoid(theta)`` ranks the
same way), and the architecture the thresholds fix (``theta > 0`` kept) is exactly the steps scored
``<= 0``, the start of that order. The steps are

- per block, its attention one choice cheaper: MSA -> 3x3 conv, 3x3 -> 1x1, 1x1 -> skip. The gates are
  nested (the choice is the number of leading gates on), so the step that leaves level ``k`` (3 MSA, 2
  3x3, 1 1x1) has the score ``min(theta_1, ..., theta_k)``: a block keeps its MSA while all three of
  its gates are high. These scores never increase from MSA down, so a block's steps come in order;
- per MLP hidden unit, dropping it (score: its own threshold).

:func:`meet_target` takes the steps in increasing score (ties, as after a few steps when Adam has moved
every threshold by the same amount: the bigger saving first, then block, then unit order) from the dense
encoder, and stops at the first one that brings the encoder to the target or below. The search's own
architecture is a start of that order, so a search that got there is kept or, when it overshot, given
back the best-scored steps it did not need; a search too short to close any gate still meets the target,
with the order its few steps learned. The thresholds are then set to that architecture (a kept gate
``>= FIXED``, a closed one ``<= -FIXED``; the others unchanged), which everything after the search reads
(``architecture``, ``rebuild``, the FLOPs).

The floor, the FLOPs of every attention skipped and every MLP unit dropped (the patch embedding and the
neck), cannot be gone below: :func:`check_reachable` refuses a target under it before any search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from samft.prune.errors import PruneError
from samft.prune.flops import choice_costs, gmacs, stem_flops, token_grid
from samft.prune.search_block import SearchBlock

FIXED = 0.05  # |threshold| given to a gate meet_target fixes: sigmoid(0.05) > 0.5 on, sigmoid(-0.05) off
LEVELS = ("skip", "conv1", "conv3", "msa")  # the choice kept at each level (number of leading gates on)
ATTN, MLP = 0, 1


@dataclass
class Order:
    """Every pruning step of a search encoder, in the order they are taken (see the module docstring)."""

    score: np.ndarray  # float64 threshold that ranks the step (lower: taken earlier)
    saving: np.ndarray  # int64 FLOPs it removes
    block: np.ndarray  # encoder block index
    kind: np.ndarray  # ATTN or MLP
    index: np.ndarray  # ATTN: the level it leaves (3 MSA, 2 3x3, 1 1x1); MLP: the hidden unit
    dense: int  # FLOPs of the dense encoder (no step taken)
    floor: int  # FLOPs with every step taken

    def remaining(self) -> np.ndarray:
        """FLOPs of the encoder after the first ``i + 1`` steps, for every ``i``."""
        return self.dense - np.cumsum(self.saving)


def attention_scores(thresholds: torch.Tensor) -> list[float]:
    """(3,) thresholds (1x1, 3x3, MSA gates) -> the scores of leaving MSA, 3x3 and 1x1 (in that order)."""
    t = [float(v) for v in thresholds.detach().float().cpu()]
    return [min(t), min(t[:2]), t[0]]


def _block_steps(blk: SearchBlock, b: int, gh: int, gw: int) -> list[np.ndarray]:
    costs = choice_costs(blk, gh, gw)
    units = blk.mlp_thresholds.detach().double().cpu().numpy()
    score = np.concatenate([attention_scores(blk.attn_thresholds), units])
    saving = np.array([costs["msa"] - costs["conv3"], costs["conv3"] - costs["conv1"], costs["conv1"]]
                      + [costs["mlp_unit"]] * len(units), dtype=np.int64)
    kind = np.array([ATTN] * 3 + [MLP] * len(units))
    index = np.concatenate([[3, 2, 1], np.arange(len(units))])
    return [score, saving, np.full(len(score), b), kind, index]


def pruning_order(encoder: nn.Module, height: int, width: int | None = None) -> Order:
    """The steps of a search encoder (every block a SearchBlock) sorted as :func:`meet_target` takes them."""
    gh, gw = token_grid(encoder, height, width)
    parts = []
    for b, blk in enumerate(encoder.blocks):
        if not isinstance(blk, SearchBlock):
            raise PruneError(f"encoder block {b} is {type(blk).__name__}, not a SearchBlock")
        parts.append(_block_steps(blk, b, gh, gw))
    score, saving, block, kind, index = (np.concatenate(p) for p in zip(*parts))
    # primary key last: score up, saving down, block, attention before units, MSA first / unit order
    perm = np.lexsort((np.where(kind == ATTN, -index, index), kind, block, -saving, score))
    perm = _nest(perm, kind, block, index)
    floor = stem_flops(encoder, height, width)
    dense = floor + int(saving.sum())
    return Order(score[perm], saving[perm], block[perm], kind[perm], index[perm], dense, floor)


def _nest(perm: np.ndarray, kind: np.ndarray, block: np.ndarray, index: np.ndarray) -> np.ndarray:
    """A block's attention steps put back in MSA, 3x3, 1x1 order within the places they hold (a tie in score
    with a bigger saving lower down must not leave 3x3 while MSA is kept)."""
    perm = perm.copy()
    attn = [pos for pos in range(len(perm)) if kind[perm[pos]] == ATTN]
    places: dict[int, list[int]] = {}
    for pos in attn:
        places.setdefault(int(block[perm[pos]]), []).append(pos)
    for slots in places.values():
        steps = sorted((perm[pos] for pos in slots), key=lambda s: -index[s])
        perm[slots] = steps
    return perm


def steps_for(order: Order, target_gmacs: float) -> int:
    """How many steps of ``order`` reach ``target_gmacs`` or below: the fewest (0 when the dense encoder is
    there already). A PruneError when even every step does not (the target is below the floor)."""
    if gmacs(order.dense) <= target_gmacs:
        return 0
    met = np.nonzero(gmacs(order.remaining()) <= target_gmacs)[0]
    if not len(met):
        raise PruneError(f"prune: target {target_gmacs:.4g} GMACs is below the floor {gmacs(order.floor):.4g} GMACs "
                         "(every attention skipped and every MLP unit dropped): it cannot be reached")
    return int(met[0]) + 1


def _fix(blk: SearchBlock, choice: int, dropped: list[int]) -> None:
    """Thresholds of ``blk`` set to keep ``choice`` (a level) and drop the units ``dropped``."""
    with torch.no_grad():
        t = blk.attn_thresholds
        t[:choice].clamp_(min=FIXED)
        if choice < 3:
            t[choice].clamp_(max=-FIXED)
        keep = torch.ones_like(blk.mlp_thresholds, dtype=torch.bool)
        keep[dropped] = False
        units = blk.mlp_thresholds
        units.copy_(torch.where(keep, units.clamp(min=FIXED), units.clamp(max=-FIXED)))


def meet_target(encoder: nn.Module, height: int, target_gmacs: float, width: int | None = None) -> float:
    """Fix a search encoder's architecture to the fewest steps of its order that reach ``target_gmacs``
    (module docstring); returns the GMACs reached."""
    order = pruning_order(encoder, height, width)
    n = steps_for(order, target_gmacs)
    for b, blk in enumerate(encoder.blocks):
        taken = order.block[:n] == b
        levels_left = int(np.sum(taken & (order.kind[:n] == ATTN)))
        _fix(blk, 3 - levels_left, order.index[:n][taken & (order.kind[:n] == MLP)].tolist())
    return float(gmacs(order.dense if n == 0 else order.remaining()[n - 1]))


def check_reachable(encoder: nn.Module, height: int, target_gmacs: float, width: int | None = None) -> None:
    """A PruneError in one line when ``target_gmacs`` is below the encoder's floor (patch embedding + neck:
    every attention skipped, every MLP unit dropped)."""
    floor = gmacs(stem_flops(encoder, height, width))
    if target_gmacs < floor:
        raise PruneError(f"prune: target {target_gmacs:.4g} GMACs is below this encoder's floor {floor:.4g} GMACs "
                         "(patch embedding + neck: every attention skipped, every MLP unit dropped): it cannot be "
                         "reached; nothing was searched")
