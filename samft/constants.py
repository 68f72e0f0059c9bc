"""Numbers shared by the model, the data pipeline and the torch-free deployment code (no imports).

SAM normalises images with the ImageNet pixel mean and standard deviation on the 0-255 scale
(``segment_anything.modeling.Sam``'s defaults): ``(pixel - PIXEL_MEAN) / PIXEL_STD`` per RGB channel.
"""

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
