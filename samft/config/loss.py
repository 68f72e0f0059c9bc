"""The ``loss`` section: the binary structure loss, the multi-class set loss, auxiliary and SLIP terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from samft.config.field import opt, section
from samft.errors import ConfigError


@dataclass
class AuxLossConfig:
    """Weights of the named auxiliary losses the model produces (each logged as ``aux_<name>``)."""

    balance: Optional[float] = opt(None, "Conv-LoRA's expert balance loss; null = the protocol's (samft: 1.0 binary, "
                                         "2.0 multi-class, as the paper; autogluon: 1.0, as AutoGluon's code)",
                                   minimum=0.0)


@dataclass
class SetLossConfig:
    points: Optional[int] = opt(None, "mask BCE/Dice on this many points per matched mask, chosen by Mask2Former's "
                                      "importance sampling, and the matcher on as many random points (0 = every "
                                      "pixel); null = the protocol's (samft 0, autogluon 12544)", minimum=0)
    oversample: float = opt(3.0, "point sampling: candidates drawn per point (Mask2Former's oversample_ratio)",
                            minimum=1.0)
    importance: float = opt(0.75, "point sampling: fraction of the points taken from the most uncertain candidates "
                                  "(|logit| smallest), the rest uniform (Mask2Former's importance_sample_ratio)",
                            minimum=0.0)
    cost_class: Optional[float] = opt(None, "matcher cost weight of -p(class); null = the protocol's (samft: "
                                            "loss.class_weight, autogluon 1)", minimum=0.0)
    cost_mask: Optional[float] = opt(None, "matcher cost weight of the mask BCE; null = the protocol's (samft: "
                                           "loss.mask_bce_weight, autogluon 5)", minimum=0.0)
    cost_dice: Optional[float] = opt(None, "matcher cost weight of the mask Dice loss; null = the protocol's "
                                           "(samft: loss.mask_dice_weight, autogluon 5)", minimum=0.0)

    def check(self, prefix: str) -> None:
        if not 0.0 <= self.importance <= 1.0:
            raise ConfigError(f"{prefix}.importance: {self.importance} must be in [0, 1]")


@dataclass
class SSLLossConfig:
    """SimCLR's NT-Xent on two augmented views of unlabelled images (SLIP's SSL branch)."""

    weight: float = opt(0.0, "weight of the SSL loss in the total loss (0 = off: nothing extra is computed)",
                        minimum=0.0)
    temperature: float = opt(0.1, "NT-Xent softmax temperature", minimum=1e-6)
    mlp_dim: int = opt(4096, "hidden width of the projection MLP (thrown away after training)", minimum=1)
    emb_dim: int = opt(256, "output width of the projection MLP (the contrasted embedding)", minimum=1)
    batch_size: int = opt(8, "unlabelled images per forward pass and process (two views each)", minimum=2)


@dataclass
class ClipLossConfig:
    """Region-text loss: ground-truth class regions of the neck features against the class-name embeddings."""

    weight: float = opt(0.0, "weight of the region-text cross-entropy (0 = off; needs data.classes and model.text)",
                        minimum=0.0)


@dataclass
class LossConfig:
    bce: str = opt("mean", "BCE term: mean (paper/reference), weighted (PraNet's boundary weights) or balanced "
                           "(shadow detection, SAM-Adapter's balanced BCE)", ("mean", "weighted", "balanced"))
    iou: bool = opt(True, "add the boundary-weighted IoU term of the structure loss")
    class_weight: Optional[float] = opt(None, "multi-class: weight of the query classification cross-entropy; null = "
                                              "the protocol's (samft 10, autogluon 1)", minimum=0.0)
    mask_bce_weight: Optional[float] = opt(None, "multi-class: weight of the matched masks' BCE; null = the "
                                                 "protocol's (samft 5, autogluon 1)", minimum=0.0)
    mask_dice_weight: Optional[float] = opt(None, "multi-class: weight of the matched masks' Dice loss; null = the "
                                                  "protocol's (samft 5, autogluon 1)", minimum=0.0)
    no_object_weight: float = opt(0.1, "multi-class: cross-entropy weight of the 'no object' class", minimum=0.0)
    ignore_padding: bool = opt(True, "leave the padding added to make the input square out of the loss")
    set: SetLossConfig = section(SetLossConfig, "multi-class set loss: point sampling and matcher costs")
    aux: AuxLossConfig = section(AuxLossConfig, "weights of the model's named auxiliary losses")
    ssl: SSLLossConfig = section(SSLLossConfig, "self-supervised loss on data.unlabelled (SLIP's SimCLR)")
    clip: ClipLossConfig = section(ClipLossConfig, "region-text loss against class-name embeddings (SLIP's CLIP)")
