"""Placement (``peft.blocks``): a method applied to some encoder blocks only.

:func:`apply_placed` opens the placement around the method's ``apply``: :func:`samft.peft.inject.replace_modules`
wraps only modules of the chosen blocks and :func:`samft.peft.inject.unfreeze` unfreezes only their base
parameters (and the stem's only with block 0), so every method honours it without knowing of it. Afterwards the
encoder is checked: a block outside the placement holds no wrapper and no trainable parameter (a method that
bypassed the two helpers is a developer error, a RuntimeError).

The blocks before the first trainable one then need no autograd graph:
:meth:`samft.model.semantic.SemanticSAM.encode` runs them under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from samft.config.peft.placement import describe_blocks, resolve_blocks
from samft.peft.inject import _PLACED, STEM, is_wrapper
from samft.peft.registry import MethodSpec


def apply_placed(spec: MethodSpec, encoder: nn.Module, cfg: Any, blocks: str, model: str) -> tuple[list[str], str]:
    """``spec.apply(encoder, cfg)`` restricted to the blocks ``blocks`` names (``model`` names the SAM size in an
    index-out-of-range error); returns the adapted names and the placement as ``describe_blocks`` writes it."""
    depth = len(encoder.blocks)
    indices = resolve_blocks(blocks, depth, model)
    token = _PLACED.set(None if len(indices) == depth else frozenset(indices))
    try:
        adapted = spec.apply(encoder, cfg)
    finally:
        _PLACED.reset(token)
    if len(indices) < depth:
        check_outside(encoder, set(indices), spec.name)
    encoder.peft_blocks = describe_blocks(indices, depth)  # recorded in the adapter's metadata
    return adapted, encoder.peft_blocks


def check_outside(encoder: nn.Module, indices: set, method: str) -> None:
    """Blocks outside ``indices`` hold no wrapper and no trainable parameter; neither does the stem's base
    without block 0."""
    for i, blk in enumerate(encoder.blocks):
        if i in indices:
            continue
        wrapped = [n for n, m in blk.named_modules() if is_wrapper(m)]
        trains = [n for n, p in blk.named_parameters() if p.requires_grad]
        if wrapped or trains or is_wrapper(blk):
            raise RuntimeError(f"PEFT method {method} adapted block {i} outside peft.blocks ({wrapped or trains}): "
                               f"it must wrap through replace_modules and unfreeze through unfreeze")
    if 0 not in indices:
        stem = [n for n, p in encoder.named_parameters()
                if n.split(".")[0] in STEM and p.requires_grad and not _new(encoder, n)]
        if stem:
            raise RuntimeError(f"PEFT method {method} unfreezes {stem[:3]} of the stem without block 0 placed")


def _new(encoder: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a wrapper's own (new) modules rather than to SAM's base."""
    module_name = name.rpartition(".")[0]
    parts = module_name.split(".")
    for k in range(len(parts), 0, -1):
        module = encoder.get_submodule(".".join(parts[:k]))
        if is_wrapper(module):
            return not name.startswith(".".join(parts[:k]) + ".base_layer.")
    return False
