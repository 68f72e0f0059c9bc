"""SLIP's wiring in training: the data streams ``cfg`` asks for (the unlabelled one when
``loss.ssl.weight > 0``), with their one-line summary and the warnings of SLIP options set without effect.
The terms themselves (SSL, region-text) are in :mod:`samft.slip.terms`; ``build_training`` adds them.
"""

from __future__ import annotations

import math
import warnings

from samft.config import unused_option_warnings
from samft.slip.terms import ssl_stream
from samft.tasks.terms import DataStream


def config_streams(ctx) -> list[DataStream]:
    """The extra streams ``ctx.cfg`` asks for (a RunContext, whose ``info`` gives the number of processes
    sharing the unlabelled images); warns of SLIP options set without effect."""
    cfg, info = ctx.cfg, ctx.info
    if ctx.main:
        for message in unused_option_warnings(cfg):  # e.g. data.unlabelled given but loss.ssl.weight 0
            warnings.warn(message, stacklevel=3)
    stream = ssl_stream(cfg, info.world_size)
    if stream is not None and ctx.main:
        from samft.progress import console

        shares = f", {math.ceil(len(stream.dataset) / info.world_size)} per process" if info.enabled else ""
        console.print(f"SSL loss: {len(stream.dataset)} unlabelled images{shares}, batches of {stream.batch_size} "
                      f"(two views each), weight {cfg.loss.ssl.weight}")
    return [stream] if stream is not None else []


__all__ = ["config_streams"]
