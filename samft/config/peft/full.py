"""Options of ``peft.method=full`` (samft/peft/full.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FullConfig:
    """No options: the whole encoder trains."""
