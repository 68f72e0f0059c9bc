"""SLIP's losses in training: the unlabelled stream that ``loss.ssl.weight > 0`` asks for, and the
region-text term on the labelled batch that ``loss.clip.weight > 0`` asks for.

    data.unlabelled images -> UnlabelledDataset: {view1, view2 (B, 3, S, S), index (B,)} per batch of
    loss.ssl.batch_size (each epoch's last incomplete batch dropped: the head's BatchNorm needs > 1 image
    and every batch the same size)
      -> ssl_loss(model, head, view1, view2, loss.ssl.temperature)   (samft.slip.ssl: encoder, pool, head, NT-Xent)
      -> the loss term "ssl", x loss.ssl.weight, logged as aux_ssl

The projection head (:class:`samft.slip.ssl.SSLHead`) is the stream's training-only module: trained with the
model, saved in the resumable state, never in an adapter file or an export. With ``loss.ssl.weight`` 0
nothing is built, read or drawn: training is that of a run without the option.

Region-text (``loss.clip.weight``): the neck features of the labelled forward (``SegOutput.features``,
(B, C, S/16, S/16)) averaged over each ground-truth class region (padding excluded), projected, and
classified against the class-name embeddings of ``model.text`` (:func:`samft.slip.text.region_text_loss`); the
term "clip", logged as ``aux_clip``. Its projection and logit scale (:class:`samft.slip.text.RegionTextHead`)
are training-only modules like the SSL head. (``model.class_head=text`` is part of the model itself: built by
``build_model``, saved with the adapter; see :mod:`samft.slip.text`.)

Under torchrun both losses train as in one process: the heads and both losses run inside the forward of
the module DDP wraps (:class:`samft.engine.train.step.TrainingModule`), so the heads' gradients are
averaged like the model's; the SSL head's BatchNorm is synchronised (:class:`samft.slip.ssl.DistBatchNorm1d`)
and NT-Xent contrasts against the embeddings of all processes, so the update is that of the loss on the
union of the processes' unlabelled batches. Each process draws its own shard of the unlabelled images,
``loss.ssl.batch_size`` of them per micro-batch. The region-text term is a per-process mean, averaged by
DDP like the task loss.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch import nn

from samft.config import Config, unused_option_warnings
from samft.data.unlabelled import UnlabelledDataset, unlabelled_images
from samft.data.transforms import valid_mask
from samft.engine.train.setup import ExtraStream, LabelledTerm
from samft.errors import ConfigError
from samft.slip.ssl import build_ssl_head, ssl_loss
from samft.slip.text import build_text_heads

SSL_STREAM = "unlabelled"


class SSLTerm:
    """The stream's loss: ``(model, batch) -> {"ssl": NT-Xent}``; builds and holds the projection head."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.head: Optional[nn.Module] = None

    def build_head(self, model: nn.Module) -> nn.Module:
        """The projection head for ``model``'s neck width (its own seed; the global RNG is not touched)."""
        self.head = build_ssl_head(self.cfg, model.image_encoder.neck[0].out_channels)
        return self.head

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``model``: the plain SemanticSAM (the loss runs inside the TrainingModule's forward)."""
        device = next(model.parameters()).device
        view1 = batch["view1"].to(device, non_blocking=True)
        view2 = batch["view2"].to(device, non_blocking=True)
        return {"ssl": ssl_loss(model, self.head, view1, view2, self.cfg.loss.ssl.temperature)}


def ssl_stream(cfg: Config, world_size: int = 1) -> Optional[ExtraStream]:
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
    term = SSLTerm(cfg)
    dataset = UnlabelledDataset(images, cfg.model.img_size, cfg.train.seed)
    return ExtraStream(SSL_STREAM, dataset, s.batch_size, term, {"ssl": s.weight}, modules=term.build_head,
                       drop_last=True)


class RegionTerm:
    """The labelled batch's region-text loss: ``(SegOutput, batch) -> {"clip": cross-entropy}``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.head: Optional[nn.Module] = None

    def build_head(self, model: nn.Module) -> nn.Module:
        """Projection + logit scale for ``model``'s neck width (reads the class-name embeddings once)."""
        _, self.head = build_text_heads(self.cfg, model)
        return self.head

    def __call__(self, out: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        feats = out.features
        size, ignore = feats.shape[-1] * 16, self.cfg.data.ignore_index
        gt = batch["mask"].to(feats.device, non_blocking=True).long()
        inside = valid_mask(batch["valid_hw"].to(feats.device), size)[:, 0].bool()
        return {"clip": self.head(feats, gt.masked_fill(~inside, ignore), ignore)}


def config_terms(cfg: Config) -> list[LabelledTerm]:
    """The labelled-batch loss terms ``cfg`` asks for (``loss.clip.weight > 0``: region-text), else []."""
    if cfg.loss.clip.weight == 0:
        return []
    term = RegionTerm(cfg)
    return [LabelledTerm("clip", term, {"clip": cfg.loss.clip.weight}, modules=term.build_head)]


def config_streams(ctx) -> list[ExtraStream]:
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


__all__ = ["SSLTerm", "RegionTerm", "ssl_stream", "config_streams", "config_terms", "SSL_STREAM"]
