"""Numbers shared across layers (torch-free): SAM's pixel normalisation and patch size."""

from __future__ import annotations

PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's RGB mean on 0..255 pixels
PIXEL_STD = (58.395, 57.12, 57.375)
PATCH = 16  # SAM's patch size: the input side must be a multiple of it
