"""SPViT's search: task loss + ``lam * (target - GMACs)^2``, thresholds in their own optimizer.

Every step: the model (its encoder blocks turned into :class:`SearchBlock` s) runs the task loss on a
batch with every path computed and gates sampled; the FLOPs term uses the architecture the thresholds
fix now (``samft.prune.flops.search_flops``, straight-through). Two AdamW optimizers step together, as
in the reference (``create_2optimizers``): the thresholds (lr ``arch_lr``, default 5e-4, no weight
decay) and every other trainable parameter (``head_probs``, the new BatchNorms, the run's PEFT
parameters and the decoder; lr ``lr``, no weight decay).

lambda: samft's own rule, not the authors' (their configs fix lambda per model): when ``lam`` is not
given it is ``LAMBDA_MARGIN * task_loss / (target - GMACs)^2`` on the first batch (GMACs of the dense
encoder), i.e. the FLOPs loss starts at 1.1 x the task loss.

The search learns an order (:mod:`samft.prune.order`): the thresholds score every attention choice and MLP
unit, and the final architecture takes the cheapest choices in that order until the target is met,
however short the search (``SearchResult.gmacs <= target``; ``search_gmacs`` is what the thresholds
alone fixed). The step budget changes the quality of the order, not whether the target is met: Adam
moves a threshold by at most about ``arch_lr`` per step and a gate closes when its threshold crosses 0
(from 1.5), so with ``steps * arch_lr < 1.5`` no gate closes by itself and the order is a rough one,
which is warned about. A target below the floor (patch embedding + neck: every attention skipped and no
MLP unit) cannot be reached and is refused before searching (:func:`samft.prune.order.check_reachable`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from samft.tasks.losses import structure_loss
from samft.tasks.task import upsample_logits
from samft.prune.errors import PruneError
from samft.prune.flops import encoder_block_flops, gmacs, search_flops
from samft.prune.order import check_reachable, meet_target
from samft.prune.rebuild import architecture
from samft.prune.search_block import ALPHA, THETA, SearchBlock
from samft.prune.search_state import SearchCheckpoint, load_search_state, restore_search_state, save_search_state

LAMBDA_MARGIN = 1.1

LossFn = Callable[[nn.Module, dict, torch.device], torch.Tensor]


def to_search(encoder: nn.Module, alpha: float = ALPHA, theta: float = THETA) -> int:
    """Wrap every encoder block in a SearchBlock (in place, same train/eval mode); returns how many."""
    count = 0
    for i, blk in enumerate(list(encoder.blocks)):
        if isinstance(blk, SearchBlock):
            continue
        wrapped = SearchBlock(blk, alpha=alpha, theta=theta, index=i)
        wrapped.train(encoder.training)
        encoder.blocks[i] = wrapped
        count += 1
    return count


def valid_region(valid_hw: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 2) valid sizes -> (B, 1, size, size) float mask, 1 inside the unpadded image."""
    rows = torch.arange(size, device=valid_hw.device)
    inside = (rows[None, :, None] < valid_hw[:, :1, None]) & (rows[None, None, :] < valid_hw[:, 1:, None])
    return inside.unsqueeze(1).float()


def binary_task_loss(model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The training loop's binary loss: structure loss on the padded-to-square input (padding ignored
    when the batch has ``valid_hw``) + the model's auxiliary (Conv-LoRA balance) loss."""
    images = batch["image"].to(device)
    target = batch["mask"].to(device).float().unsqueeze(1)
    size = images.shape[-1]
    out = model(images)
    logits = upsample_logits(out.masks, (size, size))
    valid = valid_region(batch["valid_hw"].to(device), size) if "valid_hw" in batch else None
    return structure_loss(logits, target, valid) + out.aux_loss


def auto_lambda(task_loss: float, gmacs_now: float, target: float, margin: float = LAMBDA_MARGIN) -> float:
    """lambda making ``lam * (target - gmacs_now)^2 = margin * task_loss`` (samft's rule; the authors fix
    lambda per model in their configs)."""
    gap = max((target - gmacs_now) ** 2, (1e-3 * max(target, 1e-9)) ** 2)
    return margin * max(task_loss, 1e-6) / gap


def flops_term(now_gmacs: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    """SPViT's FLOPs loss ``lam * (target - GMACs)^2`` (``now_gmacs`` from ``gmacs(search_flops(...))``).

    A training loop with named auxiliary losses can add it as ``flops`` with weight 1.
    """
    return lam * (target - now_gmacs) ** 2


@dataclass
class SearchResult:
    """What a search found: the architecture the gates' order gives for the target (``gmacs``, at or below
    ``target_gmacs``: ``reached``) and the GMACs the thresholds alone fixed (``search_gmacs``)."""

    arch: dict[str, Any]
    target_gmacs: float
    dense_gmacs: float
    gmacs: float
    lam: float
    reached: bool
    history: list[dict[str, float]] = field(default_factory=list)
    search_gmacs: Optional[float] = None


def _batches(loader_fn: Callable[[], Iterable[dict]], steps: int) -> Iterable[dict]:
    done = 0
    while done < steps:
        empty = True
        for batch in loader_fn():
            empty = False
            yield batch
            done += 1
            if done >= steps:
                return
        if empty:
            raise PruneError("prune search: the data loader yielded no batch")


def _check_target(target: float, dense: float, steps: int, arch_lr: float, theta: float) -> None:
    if target >= dense:
        warnings.warn(f"prune: target {target:.4g} GMACs is not below the dense encoder's {dense:.4g} GMACs: "
                      "nothing needs pruning", stacklevel=3)
    if steps * arch_lr < theta:
        warnings.warn(f"prune: steps x arch_lr = {steps * arch_lr:.3g} < the initial threshold {theta}: Adam cannot "
                      "move a threshold below 0 in that many steps, so no gate can close: the target is met by the "
                      "gates' order after so few steps, a rough one (more steps or arch_lr)",
                      stacklevel=3)


def search(model: nn.Module, loader_fn: Callable[[], Iterable[dict]], target_gmacs: float, steps: int,
           arch_lr: float = 5e-4, lam: Optional[float] = None, lr: float = 1e-4, alpha: float = ALPHA,
           theta: float = THETA, loss_fn: LossFn = binary_task_loss,
           device: Optional[torch.device] = None, log: Optional[Callable[[dict], None]] = None,
           checkpoint: Optional[SearchCheckpoint] = None) -> SearchResult:
    """Search ``model``'s (a SemanticSAM) encoder architecture for ``target_gmacs`` per image at its input
    size, for ``steps`` optimizer steps over ``loader_fn()`` (called again at each pass; batches are
    dicts with ``image`` (B, 3, S, S), ``mask`` (B, S, S) and optionally ``valid_hw`` (B, 2)).

    The target is met whatever ``steps`` (module docstring); one below the floor raises a PruneError
    before anything changes. The encoder's blocks stay SearchBlocks, their thresholds fixed to the
    architecture found (call :func:`samft.prune.rebuild.rebuild` to prune them);
    the model is left in eval mode. ``log`` receives each step's record. ``checkpoint``: the state is
    saved there every ``checkpoint.every`` steps, and a state found there is continued (same steps as an
    uninterrupted search: ``loader_fn`` must give the same batch order again, as a seeded loader does).
    """
    enc = model.image_encoder
    device = device or next(model.parameters()).device
    size = model.img_size
    dense = gmacs(encoder_block_flops(enc, size)["total"])  # (an encoder already searching: its current GMACs)
    check_reachable(enc, size, target_gmacs)
    to_search(enc, alpha, theta)
    _check_target(target_gmacs, dense, steps, arch_lr, theta)
    arch_params, weight_params = _parameter_groups(model)
    opt_arch = torch.optim.AdamW(arch_params, lr=arch_lr, weight_decay=0.0)
    opt_w = torch.optim.AdamW(weight_params, lr=lr, weight_decay=0.0) if weight_params and lr > 0 else None
    saved = load_search_state(checkpoint) if checkpoint is not None else None
    start, lam, history, rng = restore_search_state(saved, model, opt_arch, opt_w, lam)
    model.train()
    for step, batch in enumerate(_batches(loader_fn, steps)):
        if step < start:  # resumed: the same batch order, the steps already taken skipped
            continue
        if step == start and rng is not None:
            torch.set_rng_state(rng)
        record, lam = _step(model, batch, device, size, target_gmacs, lam, loss_fn, opt_arch, opt_w, step)
        history.append(record)
        if log is not None:
            log(record)
        if checkpoint is not None and checkpoint.due(step + 1, steps):
            save_search_state(checkpoint, step + 1, model, opt_arch, opt_w, lam, history)
    model.eval()
    return _result(enc, size, target_gmacs, dense, lam, history)


def _step(model: nn.Module, batch: dict, device: torch.device, size: int, target_gmacs: float, lam: Optional[float],
          loss_fn: LossFn, opt_arch: torch.optim.Optimizer, opt_w: Optional[torch.optim.Optimizer],
          step: int) -> tuple[dict[str, float], float]:
    """One search step (task loss + FLOPs term, both optimizers); (its record, lambda)."""
    task = loss_fn(model, batch, device)
    now = gmacs(search_flops(model.image_encoder, size))
    if lam is None:
        lam = auto_lambda(float(task.detach()), float(now.detach()), target_gmacs)
    flops_loss = flops_term(now, target_gmacs, lam)
    loss = task + flops_loss.to(task.dtype)
    if not torch.isfinite(loss.detach()):
        raise PruneError(f"prune search: the loss became {float(loss.detach())} at step {step + 1}")
    opt_arch.zero_grad(set_to_none=True)
    if opt_w is not None:
        opt_w.zero_grad(set_to_none=True)
    loss.backward()
    opt_arch.step()
    if opt_w is not None:
        opt_w.step()
    record = {"step": step + 1, "task_loss": float(task.detach()), "flops_loss": float(flops_loss.detach()),
              "gmacs": float(now.detach())}
    return record, lam


def _parameter_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(thresholds, other trainable parameters); the search's own parameters are made trainable."""
    arch, own = [], []
    for blk in model.image_encoder.blocks:
        arch += [blk.attn_thresholds, blk.mlp_thresholds]
        own += [blk.head_probs, *blk.bn3.parameters(), *blk.bn1.parameters()]
    for p in arch + own:
        p.requires_grad_(True)
    ids = {id(p) for p in arch}
    return arch, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


def _result(enc: nn.Module, size: int, target: float, dense: float, lam: Optional[float],
            history: list[dict[str, float]]) -> SearchResult:
    """The thresholds' own architecture's GMACs, then the architecture the gates' order gives for ``target``."""
    own = gmacs(encoder_block_flops(enc, size)["total"])
    final = meet_target(enc, size, target)
    arch = architecture(enc)
    return SearchResult(arch, target, dense, final, float(lam or 0.0), final <= target, history, own)
