"""Options of ``peft.method=decoder_only`` (samft/peft/decoder_only.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class DecoderOnlyConfig:
    """No options: the encoder is left as it is."""

    # the method trains nothing of the image encoder (the registry checks this against its spec)
    trains_encoder: ClassVar[bool] = False
