"""The one module a training step calls: the model and every training-only module, all losses but the task's
computed in one ``forward``.

Under torchrun this is what :class:`~torch.nn.parallel.DistributedDataParallel` wraps. DDP averages the
gradients of the parameters of the module it wraps, and only of tensors computed inside its ``forward``:
a head kept outside the wrapper (its gradient never averaged) or a call to ``model.encode`` outside the
wrapper's forward (the reducer then sees the model's parameters used without being prepared for it) lets
the processes drift apart. So the labelled forward, each labelled term (SLIP's region-text loss) and each
extra stream's loss (SLIP's SSL loss on the unlabelled batch) run here, inside one forward, with the
heads registered as submodules. Without torchrun the same module runs unwrapped: one code path.

    forward(x (B, 3, S, S), batches {stream name: batch})
      -> SegOutput of model(x), {name: scalar} of every loss term (the model's auxiliary losses among them)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from samft.errors import ConfigError


class TrainingModule(nn.Module):
    """``model`` (a SemanticSAM) and the training-only modules of ``terms``, in ``heads`` by the term's name.

    ``terms``: :class:`~samft.tasks.terms.LossTerm` (``loss(model, out, batch of its stream)``, given the plain
    model). Their ``modules`` must already be built (:func:`samft.engine.train.setup.build_training` binds them).
    """

    def __init__(self, model: nn.Module, terms: Sequence[Any] = ()) -> None:
        super().__init__()
        self.model = model
        heads: dict[str, nn.Module] = {}
        names: set[str] = set()
        for term in terms:
            if term.name in names:
                raise ConfigError(f"loss term / data stream {term.name!r}: the name is taken (by another term)")
            names.add(term.name)
            if term.modules is not None:
                if not isinstance(term.modules, nn.Module):
                    raise TypeError(f"{term.name!r}: its modules are not built yet (see build_training)")
                heads[term.name] = term.modules
        self.heads = nn.ModuleDict(heads)
        self.terms = list(terms)  # a plain list: their modules are in ``heads``

    def forward(self, x: torch.Tensor, batches: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        """x (B, 3, S, S) the labelled images on the model's device; ``batches`` the micro-batch of every
        stream (``labelled`` first) -> (SegOutput, {name: scalar value of a term})."""
        out = self.model(x)
        values: dict[str, torch.Tensor] = {}
        for term in self.terms:
            values.update(term.loss(self.model, out, batches[term.stream]))
        return out, values


__all__ = ["TrainingModule"]
