"""SLIP's losses as training terms (:class:`samft.tasks.terms.LossTerm`): the SSL term on the unlabelled stream
that ``loss.ssl.weight > 0`` asks for, and the region-text term on the labelled batch that
``loss.clip.weight > 0`` asks for.

    data.unlabelled images -> UnlabelledDataset: {view1, view2 (B, 3, S, S), index (B,)} per batch of
    loss.ssl.batch_size (each epoch's last incomplete batch dropped: the head's BatchNorm needs > 1 image
    and every batch the same size)                                           the stream "unlabelled"
      -> ssl_loss(model, head, view1, view2, loss.ssl.temperature)   (samft.slip.ssl: encoder, pool, head, NT-Xent)
      -> the value "ssl", x loss.ssl.weight, logged as aux_ssl

The projection head (:class:`samft.slip.ssl.SSLHead`) is the SSL term's training-only module (saved under the
term's name, ``unlabelled``): trained with the model, saved in the resumable state, never in an adapter file
or an export. With ``loss.ssl.weight`` 0 nothing is built, read or drawn: training is that of a run without
the option.

Region-text (``loss.clip.weight``): the neck features of the labelled forward (``SegOutput.features``,
(B, C, S/16, S/16)) averaged over each ground-truth class region (padding excluded), projected, and
classified against the class-name embeddings of ``model.text`` (:func:`samft.slip.text.region_text_loss`); the
value "clip", logged as ``aux_clip``. Its projection and logit scale (:class:`samft.slip.text.RegionTextHead`)
are training-only modules like the SSL head. (``model.class_head=text`` is part of the model itself: built by
``build_model``, saved with the adapter; see :mod:`samft.slip.text`.)

Under torchrun both losses train as in one process: the heads and both losses run inside the forward of
the module DDP wraps (``samft.engine.train.step.TrainingModule``), so the heads' gradients are averaged like
the model's; the SSL head's BatchNorm is synchronised (:class:`samft.slip.ssl.DistBatchNorm1d`) and NT-Xent
contrasts against the embeddings of all processes, so the update is that of the loss on the union of the
processes' unlabelled batches. Each process draws its own shard of the unlabelled images,
``loss.ssl.batch_size`` of them per micro-batch. The region-text term is a per-process mean, averaged by
DDP like the task loss.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from samft.config import Config
from samft.data.transforms import valid_mask
from samft.data.unlabelled import unlabelled_images
from samft.slip.augment import UnlabelledDataset
from samft.errors import ConfigError
from samft.slip.ssl import build_ssl_head, ssl_loss
from samft.slip.text import build_text_heads
from samft.tasks.terms import DataStream, LossTerm

SSL_STREAM = "unlabelled"  # the unlabelled stream's name, and the SSL term's (its head is saved under it)


class SSLTerm:
    """The SSL loss: ``(model, out, unlabelled batch) -> {"ssl": NT-Xent}``; builds and holds the projection head."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.head: Optional[nn.Module] = None

    def build_head(self, model: nn.Module) -> nn.Module:
        """The projection head for ``model``'s neck width (its own seed; the global RNG is not touched)."""
        self.head = build_ssl_head(self.cfg, model.feature_channels)
        return self.head

    def __call__(self, model: nn.Module, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``model``: the plain SemanticSAM (the loss runs inside the TrainingModule's forward)."""
        device = next(model.parameters()).device
        view1 = batch["view1"].to(device, non_blocking=True)
        view2 = batch["view2"].to(device, non_blocking=True)
        return {"ssl": ssl_loss(model, self.head, view1, view2, self.cfg.loss.ssl.temperature)}


def ssl_stream(cfg: Config, world_size: int = 1) -> Optional[DataStream]:
    """The unlabelled stream of ``cfg`` (None when ``loss.ssl.weight`` is 0: nothing is listed or built).

    ``world_size`` processes each draw ``ceil(N / world_size)`` of the N images per epoch (the
    DistributedSampler repeats a few to make the shares equal) in full batches of ``loss.ssl.batch_size``;
    fewer than one batch per process is refused in one line."""
    s = cfg.loss.ssl
    if s.weight == 0:
        return None
    if not cfg.data.unlabelled:
        raise ConfigError(f"loss.ssl.weight: {s.weight} needs unlabelled images in data.unlabelled")
    images = unlabelled_images(cfg.data)
    per_process = math.ceil(len(images) / world_size)
    if per_process < s.batch_size:
        where = "" if world_size == 1 else f" per process ({per_process} each of {world_size} processes)"
        raise ConfigError(f"loss.ssl.batch_size: {s.batch_size} is more than the {len(images)} unlabelled images of "
                          f"data.unlabelled{where} (each step needs one full batch)")
    dataset = UnlabelledDataset(images, cfg.model.img_size, cfg.train.seed)
    return DataStream(SSL_STREAM, dataset, s.batch_size, drop_last=True)


class RegionTerm:
    """The labelled batch's region-text loss: ``(model, SegOutput, batch) -> {"clip": cross-entropy}``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.head: Optional[nn.Module] = None

    def build_head(self, model: nn.Module) -> nn.Module:
        """Projection + logit scale for ``model``'s neck width (reads the class-name embeddings once)."""
        _, self.head = build_text_heads(self.cfg, model)
        return self.head

    def __call__(self, model: nn.Module, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        feats = out.features
        size, ignore = feats.shape[-1] * 16, self.cfg.data.ignore_index
        gt = batch["mask"].to(feats.device, non_blocking=True).long()
        inside = valid_mask(batch["valid_hw"].to(feats.device), size)[:, 0].bool()
        return {"clip": self.head(feats, gt.masked_fill(~inside, ignore), ignore)}


def slip_terms(cfg: Config) -> list[LossTerm]:
    """The SLIP terms ``cfg`` asks for: region-text (``loss.clip.weight > 0``), then SSL (``loss.ssl.weight > 0``,
    reading the stream :func:`ssl_stream` gives)."""
    terms = []
    if cfg.loss.clip.weight != 0:
        region = RegionTerm(cfg)
        terms.append(LossTerm("clip", region, {"clip": cfg.loss.clip.weight}, modules=region.build_head))
    if cfg.loss.ssl.weight != 0:
        ssl = SSLTerm(cfg)
        terms.append(LossTerm(SSL_STREAM, ssl, {"ssl": cfg.loss.ssl.weight}, stream=SSL_STREAM,
                              modules=ssl.build_head))
    return terms


__all__ = ["SSLTerm", "RegionTerm", "ssl_stream", "slip_terms", "SSL_STREAM"]
