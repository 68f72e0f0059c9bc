"""The ``eval`` section (evaluation and prediction) and the ``output`` section (where the run is written)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from samft.errors import ConfigError
from samft.config.field import opt


@dataclass
class EvalConfig:
    threshold: float = opt(0.5, "probability threshold for dice/iou/BER (named after it: dice@0.3 at 0.3) and "
                                 "predicted masks", minimum=0.0)
    batch_size: int = opt(4, "images per forward pass during evaluation and prediction", minimum=1, resumable=True)
    resize_gt_to_input: Optional[bool] = opt(None, "score at img_size x img_size with the ground truth resized "
                                                   "(nearest) instead of at each image's original resolution; null = "
                                                   "the protocol's (samft false, autogluon true)")
    miou: Optional[str] = opt(None, "multi-class mIoU: dataset (classes absent from prediction and ground truth left "
                                    "out, ignore-labelled pixels nowhere) or per_class_all (AutoGluon: every class, "
                                    "absent ones 0, predictions on ignore-labelled pixels in the union); null = the "
                                    "protocol's", ("dataset", "per_class_all"))
    ber: Optional[str] = opt(None, "BER: pooled (counts summed over the set) or per_image (the mean of each image's "
                                   "BER, AutoGluon); null = the protocol's", ("pooled", "per_image"))


@dataclass
class OutputConfig:
    dir: Optional[str] = opt(None, "run directory (default runs/<config file name>)")
    overwrite: bool = opt(False, "allow training into a run directory that already holds a run")

    def check(self, prefix: str) -> None:
        if self.dir is not None and not self.dir.strip():
            raise ConfigError(f"{prefix}.dir: empty; give a folder, or null for runs/<config file name>")
