"""Every extra loss is one interface: a :class:`LossTerm` returns its named scalar value(s); the training loop
adds each value ``x`` its weight to the task loss and logs it as ``aux_<name>`` in ``metrics.csv``.

    LossTerm.loss(model, out, batch) -> {name: scalar}
        model   the plain segmentation model (never a DDP wrapper)
        out     the model's output on the labelled batch (``SegOutput``)
        batch   the micro-batch of the term's data stream (``labelled``, or a :class:`DataStream`'s)

The terms: the model's own auxiliary losses (Conv-LoRA's expert ``balance``: ``out.aux_losses``), SLIP's
region-text term on the labelled batch and its SSL term on the unlabelled stream, any term a caller adds.

A layer's auxiliary loss reaches the model's output through an **aux-loss sink** (:func:`aux_sink`), a
context-scoped collector: the model opens one around its forward pass, a layer adds its named value to
the innermost open sink (:func:`active_aux_sink`) and, outside any sink, computes nothing extra. Nothing is
stored on a module, so nothing can go stale: a gradient-checkpointed block opens its own sink inside the
checkpointed function and returns the values as outputs of it; the recomputation in the backward pass
opens a fresh sink again, whose values are dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

LABELLED = "labelled"  # the labelled data stream's name


@dataclass
class DataStream:
    """A data stream besides the labelled one (e.g. SLIP's unlabelled images), drawn once per micro-batch.

    The dataset may have ``set_epoch(epoch)``; the stream cycles through its own epochs independently of
    the labelled one and resumes exactly; under torchrun each process draws its own shard. ``drop_last``:
    skip each epoch's last incomplete batch (a term that needs full batches, e.g. BatchNorm)."""

    name: str
    dataset: Any
    batch_size: int
    collate: Optional[Callable] = None
    drop_last: bool = False


Modules = Union[nn.Module, Callable[[nn.Module], nn.Module], None]


@dataclass
class LossTerm:
    """One extra loss: ``loss(model, out, batch) -> {name: scalar}`` (see the module docstring); each value is
    added with ``weights[name]`` and logged as ``aux_<name>``.

    ``stream``: the data stream whose batch ``loss`` receives. ``modules``: the term's training-only modules
    (e.g. a projection head), or a function ``model -> module`` that builds them for the built model: trained
    with the model, saved in the resumable state under ``name``, never in adapter files or exports."""

    name: str
    loss: Callable[[Any, Any, Any], dict[str, torch.Tensor]]
    weights: dict[str, float]
    stream: str = LABELLED
    modules: Modules = None


class AuxSink:
    """The named auxiliary losses added while it is open, in the order added (float32)."""

    def __init__(self) -> None:
        self.added: list[tuple[str, torch.Tensor]] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        self.added.append((name, value.float()))

    def extend(self, added: list[tuple[str, torch.Tensor]]) -> None:
        """Take over another sink's values (a checkpointed block's), keeping their order."""
        for name, value in added:
            self.add(name, value)

    @property
    def values(self) -> dict[str, torch.Tensor]:
        """The sum per name, in the order added (the same sums whether or not blocks were checkpointed)."""
        sums: dict[str, torch.Tensor] = {}
        for name, value in self.added:
            sums[name] = sums[name] + value if name in sums else value
        return sums


_SINK: contextvars.ContextVar[Optional[AuxSink]] = contextvars.ContextVar("samft_aux_sink", default=None)


@contextlib.contextmanager
def aux_sink(enabled: bool = True) -> Iterator[Optional[AuxSink]]:
    """Open a sink for the auxiliary losses computed inside the block (``enabled=False``: hide any outer
    sink, so that the layers inside compute nothing extra); yields it (None when disabled)."""
    sink = AuxSink() if enabled else None
    token = _SINK.set(sink)
    try:
        yield sink
    finally:
        _SINK.reset(token)


def active_aux_sink() -> Optional[AuxSink]:
    """The innermost open sink, or None: a layer then skips its auxiliary loss."""
    return _SINK.get()


def model_aux_term(weights: dict[str, float]) -> LossTerm:
    """The model's own auxiliary losses (``out.aux_losses``) as a term, weighted by ``weights``."""
    return LossTerm("model", lambda model, out, batch: dict(out.aux_losses), dict(weights))


__all__ = ["LABELLED", "DataStream", "LossTerm", "AuxSink", "aux_sink", "active_aux_sink", "model_aux_term"]
