"""Finding and wrapping the modules a PEFT method adapts."""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from samft.config.peft.targets import LINEAR_TARGETS, check_choices, check_targets  # noqa: F401
from samft.errors import ConfigError


# the encoder blocks the method being applied may adapt (peft.blocks); None: every block. Set by
# samft.peft.placement.apply_placed around a method's apply, read by replace_modules and unfreeze.
_PLACED: ContextVar[Optional[frozenset]] = ContextVar("samft_peft_blocks", default=None)

STEM = ("patch_embed", "pos_embed")  # what runs before the blocks: its base parameters train only with block 0


def block_index(name: str) -> Optional[int]:
    """The block of an encoder-relative name (``blocks.3.attn.qkv`` -> 3), None outside the blocks."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None


def placed(name: str, base: bool = False) -> bool:
    """Whether the open placement lets a method adapt module ``name`` (``base``: unfreeze base parameter
    ``name``). Blocks: those of ``peft.blocks``. The stem's base parameters (patch embedding, position embedding)
    train only when block 0 does, else the frozen first blocks could not run without a graph; a new module there
    (SAM-Adapter's prompt generator) and everything after the blocks (the neck) follow the method's own rule."""
    blocks = _PLACED.get()
    if blocks is None:
        return True
    index = block_index(name)
    if index is not None:
        return index in blocks
    return not (base and name.split(".")[0] in STEM) or 0 in blocks


def _where() -> str:
    blocks = _PLACED.get()
    return "" if blocks is None else f" in the blocks of peft.blocks ({', '.join(map(str, sorted(blocks)))})"


class AdapterLayer(nn.Module):
    """Base of every wrapper: the wrapped original module is ``self.base_layer`` (frozen).

    A layer that produces an auxiliary loss (Conv-LoRA's expert balance loss) declares its name in
    ``aux_name`` and adds the value to the open aux-loss sink during forward
    (:func:`samft.tasks.terms.active_aux_sink`; nothing is stored on the layer); the model returns the sums in
    its output and the training loop weighs each by ``loss.aux.<aux_name>``.

    ``export_friendly`` is set by the ONNX exporter (``samft.engine.artifacts.onnx_export``) for the duration of
    an export: a layer whose eval-mode forward does not trace to a static graph (Conv-LoRA's
    data-dependent expert dispatch, SAM-Adapter's FFT) then computes the same function with traceable
    operations (each tested equal to its normal path).
    """

    base_layer: nn.Module
    aux_name: str = ""  # non-empty: this layer produces the auxiliary loss of that name
    export_friendly: bool = False


def is_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT layer around a frozen ``base_layer``: samft's :class:`AdapterLayer` or one of HF
    peft's tuner layers (``peft.method=hf``; recognised without importing peft, which a model of hers imported)."""
    if isinstance(module, AdapterLayer):
        return True
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and isinstance(module, tuners.BaseTunerLayer)


def replace_modules(
    root: nn.Module,
    match: Callable[[str, nn.Module], bool],
    build: Callable[[nn.Module], nn.Module],
    method: str,
    wanted: str,
) -> list[str]:
    """Replace every sub-module of ``root`` for which ``match(name, module)`` holds by ``build(module)``.

    Returns the replaced names; raises a ConfigError naming ``wanted`` when nothing matched.
    """
    names = placed_modules(root, match, method, wanted)
    for name in names:
        set_module(root, name, build(root.get_submodule(name)))
    return names


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` under ``root`` (``blocks.3.attn.qkv``), in place of what is there."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def placed_modules(root: nn.Module, match: Callable[[str, nn.Module], bool], method: str, wanted: str) -> list[str]:
    """The names of ``root``'s sub-modules for which ``match(name, module)`` holds, kept to the open placement;
    a ConfigError naming ``wanted`` when there is none."""
    names = [name for name, module in root.named_modules() if name and match(name, module) and placed(name)]
    if not names:
        raise ConfigError(f"PEFT method {method}: no module of the image encoder matched {wanted}{_where()}")
    return names


def flatten_input(layer: nn.Module, dims: int) -> None:
    """Make ``layer`` (a linear that takes at most ``dims``-D input) run on SAM's (B, H, W, C) tokens: its input
    is flattened to ``dims`` dimensions (the last one kept) and the output given the input's leading shape back,
    by two forward hooks (the state dict is unchanged)."""

    def before(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        module._samft_lead = x.shape[:-1] if x.dim() > dims else None
        return args if x.dim() <= dims else (x.reshape(*x.shape[:dims - 2], -1, x.shape[-1]),) + args[1:]

    def after(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        lead = module._samft_lead
        return out if lead is None else out.reshape(*lead, out.shape[-1])

    layer.register_forward_pre_hook(before)
    layer.register_forward_hook(after)


def merge_layers(root: nn.Module, cls: type) -> int:
    """Replace every ``cls`` wrapper under ``root`` by its ``merged()`` plain module; returns how many."""
    names = [n for n, m in root.named_modules() if isinstance(m, cls)]
    for name in names:
        set_module(root, name, root.get_submodule(name).merged())
    return len(names)


def unfreeze(encoder: nn.Module, names: list[str], method: str, wanted: str) -> list[str]:
    """Let the named base parameters train (chosen by the method's structural rule, kept to the open placement);
    raises if none."""
    names = [name for name in names if placed(name, base=True)]
    if not names:
        raise ConfigError(f"PEFT method {method}: the image encoder has no {wanted}{_where()}")
    for name in names:
        encoder.get_parameter(name).requires_grad_(True)
    return names


def linear_targets(targets: Iterable[str]) -> Callable[[str, nn.Module], bool]:
    """Match the encoder blocks' ``nn.Linear`` layers whose attribute name is in ``targets``.

    ``qkv``/``proj`` are the attention projections, ``lin1``/``lin2`` the MLP layers of every block
    (``blocks.i.attn.qkv``, ``blocks.i.mlp.lin1``: never a block's own Linear, such as the width-changing
    ``blocks.i.proj`` of Hiera's first block of a stage).
    """
    wanted = set(targets)
    unknown = wanted - set(LINEAR_TARGETS)
    if unknown:
        raise ConfigError(f"unknown target(s) {sorted(unknown)}; choose from {', '.join(LINEAR_TARGETS)}")

    def match(name: str, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Linear)
            and name.startswith("blocks.")
            and len(name.split(".")) >= 4
            and name.rsplit(".", 1)[-1] in wanted
        )

    return match
