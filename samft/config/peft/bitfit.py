"""Options of ``peft.method=bitfit`` (samft/peft/bitfit.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BitFitConfig:
    """No options: every bias of the encoder trains."""
