"""After search: fixed indicators, blocks rebuilt as plain modules, and the architecture description.

A ``PrunedBlock`` has the contract of SAM's ``Block`` (x (B, H, W, C) -> (B, H, W, C)) and holds only
what its choice needs:

- ``msa``: ``norm1`` + the block's own ``attn`` (PEFT wrappers included, so the run's method keeps
  training it) on SAM's windows;
- ``conv3`` / ``conv1``: ``norm1`` + a :class:`ConvBottleneck` (Conv2d C -> d, BatchNorm, ReLU, Linear
  d -> C) on the whole grid; the attention, its windows and its ``rel_pos_*`` tables are gone;
- ``skip``: nothing (the residual alone);
- the MLP: ``norm2`` + an ``MLPBlock`` whose ``lin1``/``lin2`` keep only the kept hidden units (a LoRA
  on them is sliced with them and keeps training); no kept unit: no MLP (and no ``norm2``).

Trainable after rebuilding: what was (the run's PEFT parameters, the decoder) plus the new convolution
and BatchNorm parameters; the sliced base weights stay frozen.

The architecture description is JSON-able::

    {"format": "spvit-1", "blocks": [{"attn": "msa" | "conv3" | "conv1" | "skip",
                                      "mlp_units": 2310, "mlp_keep": "0-17,19,21-3071"}, ...]}

``mlp_keep`` lists the kept unit indices as ranges. :func:`build_pruned_encoder` rebuilds a dense SAM
encoder (e.g. a freshly built model of a pruned run) to that structure, so the pruned run's state dict
loads into it.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from samft.prune.derived import POSITIONS, ConvBottleneck, effective_linear
from samft.prune.errors import PruneError
from samft.prune.gates import CHOICES
from samft.prune.search_block import ALPHA, SearchBlock, attention_core, check_block, out_features

FORMAT = "spvit-1"


class PrunedBlock(nn.Module):
    """A rebuilt encoder block (see the module docstring); ``mixer`` is msa, conv3, conv1 or skip."""

    def __init__(self, mixer: str, norm1: Optional[nn.Module] = None, attn: Optional[nn.Module] = None,
                 conv: Optional[ConvBottleneck] = None, window_size: int = 0, norm2: Optional[nn.Module] = None,
                 mlp: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm1, self.attn, self.conv = norm1, attn, conv
        self.window_size = window_size if mixer == "msa" else 0
        self.norm2, self.mlp = norm2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            y = self.norm1(x)
            if self.window_size > 0:
                h, w = y.shape[1], y.shape[2]
                windows, pad_hw = window_partition(y, self.window_size)
                y = window_unpartition(self.attn(windows), self.window_size, pad_hw, (h, w))
            else:
                y = self.attn(y)
            x = x + y
        elif self.conv is not None:
            x = x + self.conv(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    @property
    def mlp_units(self) -> int:
        return 0 if self.mlp is None else out_features(self.mlp.lin1)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer}, window_size={self.window_size}, mlp_units={self.mlp_units}"


# -- unit index ranges ---------------------------------------------------------------------------
def format_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sorted, unique)."""
    parts, run = [], []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)


def parse_ranges(text: str, size: int, where: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]; each index must be in [0, size)."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise PruneError(f"{where}: {part!r} is not an index or a range like 3-7") from None
        if not 0 <= a <= b < size:
            raise PruneError(f"{where}: {part!r} is outside the {size} MLP units (0-{size - 1})")
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        raise PruneError(f"{where}: an MLP unit is listed twice")
    return sorted(out)


# -- building pruned blocks ----------------------------------------------------------------------
def pruned_mlp(mlp: nn.Module, keep: torch.Tensor) -> Optional[MLPBlock]:
    """An ``MLPBlock`` with the ``keep`` hidden units of ``mlp`` (``lin1`` rows, ``lin2`` columns), or None.

    Plain Linears are sliced; a LoRA-style wrapper (LoRA, Conv-LoRA) keeps wrapping its sliced base with
    ``lora_B`` rows / ``lora_A`` columns sliced (so the run's method keeps training it); any other
    wrapper is merged into a plain, frozen Linear (warned). Trainability follows the originals.
    """
    if keep.numel() == 0:
        return None
    lin1 = sliced_linear(mlp.lin1, rows=keep)
    lin2 = sliced_linear(mlp.lin2, cols=keep)
    out = MLPBlock(out_features(lin2), int(keep.numel()), type(mlp.act))
    out.lin1, out.lin2, out.act = lin1, lin2, mlp.act
    return out


def _plain(weight: torch.Tensor, bias: Optional[torch.Tensor], like: Optional[nn.Linear]) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.weight.requires_grad_(like is not None and like.weight.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(like is not None and like.bias is not None and like.bias.requires_grad)
    return out


def sliced_linear(linear: nn.Module, rows: Optional[torch.Tensor] = None,
                  cols: Optional[torch.Tensor] = None) -> nn.Module:
    """``linear`` keeping output ``rows`` / input ``cols`` (see :func:`pruned_mlp`)."""
    if isinstance(linear, nn.Linear):
        w, b = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        if rows is not None:
            w, b = w[rows.to(w.device)], None if b is None else b[rows.to(w.device)]
        if cols is not None:
            w = w[:, cols.to(w.device)]
        return _plain(w, b, linear)
    base = getattr(linear, "base_layer", None)
    if isinstance(base, nn.Linear) and hasattr(linear, "lora_A") and hasattr(linear, "lora_B"):
        new = copy.copy(linear)  # a shallow copy with its own module/parameter tables
        new._modules, new._parameters = dict(linear._modules), dict(linear._parameters)
        new.base_layer = sliced_linear(base, rows, cols)
        if rows is not None:
            new.lora_B = nn.Parameter(linear.lora_B.detach()[rows.to(base.weight.device)].clone(),
                                      requires_grad=linear.lora_B.requires_grad)
        if cols is not None:
            new.lora_A = nn.Parameter(linear.lora_A.detach()[:, cols.to(base.weight.device)].clone(),
                                      requires_grad=linear.lora_A.requires_grad)
        return new
    warnings.warn(f"prune: {type(linear).__name__} on an MLP layer cannot be sliced: merged into a plain frozen "
                  "Linear", stacklevel=3)
    w, b = (t.detach() if t is not None else None for t in effective_linear(linear))
    plain = _plain(w, b, None)
    return sliced_linear(plain, rows, cols)


def _warn_dropped_experts(block: nn.Module, index: int, mixer: str) -> None:
    """One line when a converted block's Conv-LoRA ``qkv`` loses its non-linear experts (linear part kept)."""
    layers = [("attn.qkv", attention_core(block.attn).qkv)] if mixer in ("conv3", "conv1") else []
    for name, layer in layers:
        if hasattr(layer, "lora_A") and hasattr(layer, "gate"):
            warnings.warn(f"prune: block {index} {name}: Conv-LoRA's convolutional experts are dropped, its linear "
                          "part W0 + s*Wd*We is kept (the experts cannot be folded into a plain layer)", stacklevel=3)


def prune_block(block: nn.Module, mixer: str, keep: torch.Tensor, head_probs: Optional[torch.Tensor] = None,
                alpha: float = ALPHA, bn: Optional[nn.BatchNorm2d] = None, index: int = 0) -> PrunedBlock:
    """SAM's ``block`` (or a SearchBlock's modules) rebuilt for ``mixer`` with MLP units ``keep``.

    ``head_probs`` (heads, 9) defaults to ones (every kernel position the mean of the heads); ``bn`` is
    the searched BatchNorm of the chosen convolution (its statistics are copied).
    """
    _warn_dropped_experts(block, index, mixer)
    mlp = pruned_mlp(block.mlp, keep)
    norm2 = block.norm2 if mlp is not None else None
    if mixer == "msa":
        return PrunedBlock("msa", block.norm1, attn=block.attn, window_size=block.window_size, norm2=norm2, mlp=mlp)
    if mixer in ("conv3", "conv1"):
        core = attention_core(block.attn)
        if head_probs is None:
            head_probs = torch.ones(core.num_heads, POSITIONS, device=effective_linear(core.proj)[0].device)
        conv = ConvBottleneck.derived(block.attn, head_probs, alpha, 3 if mixer == "conv3" else 1, bn)
        return PrunedBlock(mixer, block.norm1, conv=conv, norm2=norm2, mlp=mlp)
    return PrunedBlock("skip", norm2=norm2, mlp=mlp)


def block_entry(mixer: str, keep: list[int]) -> dict[str, Any]:
    return {"attn": mixer, "mlp_units": len(keep), "mlp_keep": format_ranges(keep)}


def architecture(encoder: nn.Module) -> dict[str, Any]:
    """The description of the architecture the SearchBlocks' thresholds fix now."""
    blocks = []
    for i, blk in enumerate(encoder.blocks):
        if not isinstance(blk, SearchBlock):
            raise PruneError(f"encoder block {i} is {type(blk).__name__}, not a SearchBlock: run the search first")
        blocks.append(block_entry(blk.choice(), blk.kept_units().tolist()))
    return {"format": FORMAT, "blocks": blocks}


def rebuild(encoder: nn.Module) -> dict[str, Any]:
    """Replace every SearchBlock of ``encoder`` by its PrunedBlock (fixed indicators, searched head_probs
    and BatchNorm statistics); returns the architecture description."""
    arch = architecture(encoder)
    for i, (blk, entry) in enumerate(zip(list(encoder.blocks), arch["blocks"])):
        mixer = entry["attn"]
        bn = blk.bn3 if mixer == "conv3" else blk.bn1
        pruned = prune_block(blk, mixer, blk.kept_units(), blk.head_probs.detach(), blk.alpha, bn, i)
        encoder.blocks[i] = pruned.train(blk.training)
    return arch


def check_architecture(encoder: nn.Module, arch: Any) -> list[tuple[str, list[int]]]:
    """Validate ``arch`` against ``encoder`` (dense SAM blocks); returns (mixer, kept units) per block."""
    blocks = arch.get("blocks") if isinstance(arch, dict) else None
    if not isinstance(blocks, list) or (isinstance(arch, dict) and arch.get("format", FORMAT) != FORMAT):
        raise PruneError(f"architecture: expected {{'format': '{FORMAT}', 'blocks': [...]}}, got {str(arch)[:80]!r}")
    if len(blocks) != len(encoder.blocks):
        raise PruneError(f"architecture: {len(blocks)} blocks described, the encoder has {len(encoder.blocks)}")
    out = []
    for i, (entry, blk) in enumerate(zip(blocks, encoder.blocks)):
        check_block(blk, i)
        where = f"architecture block {i}"
        if not isinstance(entry, dict) or entry.get("attn") not in CHOICES:
            raise PruneError(f"{where}: 'attn' must be one of {', '.join(CHOICES)}, got {entry!r:.80}")
        keep = parse_ranges(entry.get("mlp_keep", ""), out_features(blk.mlp.lin1), f"{where} mlp_keep")
        if "mlp_units" in entry and entry["mlp_units"] != len(keep):
            raise PruneError(f"{where}: mlp_units {entry['mlp_units']} but mlp_keep lists {len(keep)} units")
        out.append((entry["attn"], keep))
    return out


def build_pruned_encoder(encoder: nn.Module, arch: dict[str, Any], alpha: float = ALPHA) -> nn.Module:
    """Rebuild the dense SAM ``encoder`` in place to the structure ``arch`` describes (checked first).

    Converted blocks get convolutions derived with uniform head probabilities and fresh BatchNorms: load
    the pruned run's state dict afterwards for its trained values. Returns ``encoder``.
    """
    plan = check_architecture(encoder, arch)
    for i, (mixer, keep) in enumerate(plan):
        blk = encoder.blocks[i]
        device = effective_linear(attention_core(blk.attn).proj)[0].device
        pruned = prune_block(blk, mixer, torch.tensor(keep, dtype=torch.long, device=device), alpha=alpha, index=i)
        encoder.blocks[i] = pruned.train(blk.training)
    return encoder


def summary(arch: dict[str, Any]) -> str:
    """One line: the count of each choice and the kept MLP units."""
    blocks = arch["blocks"]
    counts = {c: sum(b["attn"] == c for b in blocks) for c in reversed(CHOICES)}
    units = sum(b["mlp_units"] for b in blocks)
    return ", ".join(f"{n} {c}" for c, n in counts.items() if n) + f"; {units} MLP units kept"
