"""SPViT (He et al., TPAMI 2024): prune SAM's encoder to a FLOPs target.

Per block, the attention can become a 3x3 or 1x1 bottleneck convolution derived from the block's own
value/output projections (``derived``), or be skipped; MLP hidden units can be dropped. Gates with
learnable thresholds (``gates``) in ``SearchBlock`` s (``search_block``) and a FLOPs loss (``flops``)
find the architecture (``search``); the blocks are then rebuilt as plain modules (``rebuild``).
"""

from samft.prune.errors import PruneError

__all__ = ["PruneError"]
