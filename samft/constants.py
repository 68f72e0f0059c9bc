"""Numbers shared by the model, the data pipeline and the torch-free deployment code (no imports).

SAM normalises images with the ImageNet pixel mean and standard deviation on the 0-255 scale
(``segment_anything.modeling.Sam``'s defaults): ``(pixel - PIXEL_MEAN) / PIXEL_STD`` per RGB channel.
"""

from __future__ import annotations

PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's RGB mean on 0..255 pixels
PIXEL_STD = (58.395, 57.12, 57.375)
PATCH = 16  # SAM's patch size: the input side must be a multiple of it
