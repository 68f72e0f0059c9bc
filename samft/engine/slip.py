"""SLIP's losses in training: the unlabelled stream that ``loss.ssl.weight > 0`` asks for, and the
region-text term on the labelled batch that ``loss.clip.weight > 0`` asks for.

    data.unlabelled images -> UnlabelledDataset: {view1, view2 (B, 3, S, S), index (B,)} per batch of
    loss.ssl.batch_size (each epoch's last incomplete batch dropped: the head's BatchNorm needs > 1 image
    and every batch the same size)
      -> ssl_loss(model, head, view1, view2, loss.ssl.temperature)   (samft.ssl: encoder, pool, head, NT-Xent)
      -> the loss term "ssl", x loss.ssl.weight, logged as aux_ssl

The projection head (:class:`samft.ssl.SSLHead`) is the stream's training-only module: trained with the
model, saved in the resumable state, never in an adapter file or an export. With ``loss.ssl.weight`` 0
nothing is built, read or drawn: training is that of a run without the option.

Region-text (``loss.clip.weight``): the neck features of the labelled forward (``SegOutput.features``,
(B, C, S/16, S/16)) averaged over each ground-truth class region (padding excluded), projected, and
classified against the class-name embeddings of ``model.text`` (:func:`samft.text.region_text_loss`); the
term "clip", logged as ``aux_clip``. Its projection and logit scale (:class:`samft.text.RegionTextHead`)
are training-only modules like the SSL head. (``model.class_head=text`` is part of the model itself: built by
``build_model``, saved with the adapter; see :mod:`samft.text`.)

Under torchrun the SSL branch is refused (one line naming the option): the head would live outside the
DDP wrapper and calling ``encode`` outside DDP's forward breaks its reducer (see tests/test_ssl.py).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from samft.config import Config, unused_option_warnings
from samft.data.unlabelled import UnlabelledDataset, unlabelled_images
from samft.data.transforms import valid_mask
from samft.engine.setup import ExtraStream, LabelledTerm
from samft.errors import ConfigError
from samft.ssl import build_ssl_head, ssl_loss
from samft.text import build_text_heads

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

    def __call__(self, module: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        model = getattr(module, "module", module)
        device = next(model.parameters()).device
        view1 = batch["view1"].to(device, non_blocking=True)
        view2 = batch["view2"].to(device, non_blocking=True)
        return {"ssl": ssl_loss(model, self.head, view1, view2, self.cfg.loss.ssl.temperature)}


def ssl_stream(cfg: Config) -> Optional[ExtraStream]:
    """The unlabelled stream of ``cfg`` (None when ``loss.ssl.weight`` is 0: nothing is listed or built)."""
    s = cfg.loss.ssl
    if s.weight == 0:
        return None
    if not cfg.data.unlabelled:
        raise ConfigError(f"loss.ssl.weight: {s.weight} needs unlabelled images in data.unlabelled")
    images = unlabelled_images(cfg.data)
    if len(images) < s.batch_size:
        raise ConfigError(f"loss.ssl.batch_size: {s.batch_size} is more than the {len(images)} unlabelled images of "
                          f"data.unlabelled (each step needs one full batch)")
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


def config_terms(cfg: Config, distributed: bool = False) -> list[LabelledTerm]:
    """The labelled-batch loss terms ``cfg`` asks for (``loss.clip.weight > 0``: region-text), else [];
    refused under torchrun (``distributed``)."""
    if cfg.loss.clip.weight == 0:
        return []
    if distributed:
        raise ConfigError(f"loss.clip.weight: {cfg.loss.clip.weight}: the region-text loss is not supported under "
                          f"torchrun in this version; train in one process or set loss.clip.weight=0")
    term = RegionTerm(cfg)
    return [LabelledTerm("clip", term, {"clip": cfg.loss.clip.weight}, modules=term.build_head)]


def config_streams(ctx) -> list[ExtraStream]:
    """The extra streams ``ctx.cfg`` asks for (a RunContext); refuses the SSL loss under torchrun and warns
    of SLIP options set without effect."""
    cfg, info = ctx.cfg, ctx.info
    if ctx.main:
        for message in unused_option_warnings(cfg):  # e.g. data.unlabelled given but loss.ssl.weight 0
            warnings.warn(message, stacklevel=3)
    if cfg.loss.ssl.weight > 0 and info.enabled:
        raise ConfigError(f"loss.ssl.weight: {cfg.loss.ssl.weight}: the SSL loss is not supported under torchrun "
                          f"in this version; train in one process or set loss.ssl.weight=0")
    stream = ssl_stream(cfg)
    if stream is not None and ctx.main:
        from samft.progress import console

        console.print(f"SSL loss: {len(stream.dataset)} unlabelled images, batches of {stream.batch_size} "
                      f"(two views each), weight {cfg.loss.ssl.weight}")
    return [stream] if stream is not None else []


__all__ = ["SSLTerm", "RegionTerm", "ssl_stream", "config_streams", "config_terms", "SSL_STREAM"]
