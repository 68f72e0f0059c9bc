"""The error pruning raises on bad input (a model it cannot prune, a wrong architecture description)."""

from __future__ import annotations

from samft.errors import SamftError


class PruneError(SamftError):
    """The model or an architecture description cannot be pruned / rebuilt as asked."""
